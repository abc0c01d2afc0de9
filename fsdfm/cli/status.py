"""`fsdfm status SPEC|DIR [overrides] [--follow]`: the stages of a study, before its first run too (all pending)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fsdfm.cli.spec import resolve_spec, study_dir
from fsdfm.launch import status
from fsdfm.records import read_study_plan


def _status_plan(args, sdir: Path):
    """The plan `fsdfm status` reports on: plan.json of the study, or (a spec that has not run yet) its plan
    from the spec, every stage pending."""
    from fsdfm.methods import plan_study  # heavy: torch; a study that ran needs only its plan.json

    if (sdir / "plan.json").exists() or Path(args.target).is_dir():
        return read_study_plan(sdir)
    r = resolve_spec(args, check_files=False)
    return plan_study(r.name, r.cells)


STATUS_FINAL = ("done", "failed", "blocked")


def cmd_status(args) -> dict:
    sdir = study_dir(args)
    updates = 0
    while True:
        plan = _status_plan(args, sdir)  # re-read: a run may write plan.json meanwhile
        report = status(sdir, plan=plan)
        updates += 1
        if args.follow and sys.stdout.isatty():
            print("\033[H\033[J", end="")  # clear the terminal: the status replaces the last one
        print(report.format(), flush=True)
        finished = all(s.state in STATUS_FINAL for s in report.stages)
        if not args.follow or finished or (args.max_updates is not None and updates >= args.max_updates):
            break
        time.sleep(max(0.05, args.interval))
    return {
        "study": report.study,
        **report.counts(),
        "runs_done": report.runs_done,
        "runs_total": report.runs_total,
        "planned": not (sdir / "plan.json").exists(),
        "updates": updates,
    }
