"""`--track` on stages that finished untracked: their recorded results logged to the tracker afterwards.

A stage that ran without tracking has no event folder; re-running it to get one would redo finished work (tracking
is in no stage id, so the stage is rightly skipped). What its record keeps is logged instead: the final metrics
(`metrics/<name>`, at the final step, as a tracked run logs them) and a training stage's `loss_curve` (window means
of the loss, `train/loss_curve` at the window's first step). Per-step `train/loss`, `train/lr` and
`train/tokens_per_s` are not recorded, so they cannot be backfilled: `Backfill.missing` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsdfm.records import read_record, stage_dir
from fsdfm.tracking import log_dir, log_final, stage_tracking


@dataclass(frozen=True)
class Backfill:
    """What `backfill_tracking` did: `logged` stage ids written now, `present` those that already had an event
    folder (left alone), `no_record` those without a readable record, `missing` what could not be backfilled."""

    logged: tuple = ()
    present: tuple = ()
    no_record: tuple = ()
    missing: str = ""

    def format(self) -> str:
        parts = [f"tracking: backfilled {len(self.logged)} finished stage(s) from their records"]
        if self.present:
            parts.append(f"{len(self.present)} already tracked")
        if self.no_record:
            parts.append(f"{len(self.no_record)} without a record")
        return ", ".join(parts) + (f" ({self.missing})" if self.logged and self.missing else "")


def backfill_tracking(plan: dict, study_dir: str | Path, stage_ids) -> Backfill:
    """Log the records of finished stages `stage_ids` of `plan` (plan.json's dict, tracking on) that have no event
    folder yet. Returns what was done (`Backfill`)."""
    settings = plan.get("tracking") or {}
    if not settings:
        return Backfill(missing="tracking is off in this plan")
    root = log_dir(settings, study_dir)
    logged, present, no_record = [], [], []
    for sid in stage_ids:
        if (root / sid).exists():
            present.append(sid)
            continue
        rec = read_record(stage_dir(Path(study_dir), sid))
        if not rec:
            no_record.append(sid)
            continue
        payload = rec.get("payload") or {}
        runs = [r["run_id"] for r in plan.get("runs", []) if r.get("stage_id") == sid]
        steps = (rec.get("config", {}).get("optim") or {}).get("steps")
        final = int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else 0
        with stage_tracking(settings, study_dir, sid, rec.get("kind", sid.rsplit("-", 1)[0]), runs) as tracker:
            curve = payload.get("loss_curve") or []
            window = max(1, final // len(curve)) if curve and final else 1
            for i, loss in enumerate(curve):
                tracker.scalar("train/loss_curve", float(loss), i * window)
            tracker.text("backfilled", "logged after the stage finished, from its record.json")
            log_final(tracker, payload, step=final)
        logged.append(sid)
    return Backfill(
        tuple(logged),
        tuple(present),
        tuple(no_record),
        "per-step train/loss, train/lr and train/tokens_per_s are not recorded; re-run with --rerun KIND to log them",
    )
