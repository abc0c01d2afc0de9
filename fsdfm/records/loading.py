"""Finished records back as tables: `load() -> pandas.DataFrame` (one row per run), `load_records`, `load_samples`,
and the listing of the studies under a results root.

Reads only what `fsdfm.records.layout` says is on disk; runs nothing and imports no stage code. A run's row is
whole: besides its grid parameters and metrics it carries the settings of every stage upstream of its final stage,
as namespaced columns (`settings_columns`), so an ablation can be grouped by what it varied.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from fsdfm.records.layout import PLAN, STAGES, STORE, read_plan_or_warn, read_record, stage_dir
from fsdfm.records.per_sample import PER_SAMPLE, read_per_sample


# ----------------------------------------------------------------------------------------------- loading
def find_studies(path: str | os.PathLike) -> list[Path]:
    """Study directories under `path`: `path` itself if it holds plan.json, else those up to 3 levels down."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    if (path / PLAN).is_file():
        return [path]
    for depth in range(1, 4):
        found = sorted(p.parent for p in path.glob("/".join(["*"] * depth) + "/" + PLAN))
        # neither a stage folder nor the shared store (fsdfm.records.store) holds studies
        found = [p for p in found if not {STAGES, STORE} & set(p.relative_to(path).parts)]
        if found:
            return found
    return []


@dataclass(frozen=True)
class StudyListing:
    """One study under a results root (`list_studies`): its name, folder, and how much of it is done."""

    name: str
    path: str
    stages_done: int
    stages_total: int
    runs_done: int
    runs_total: int


def list_studies(root: str | os.PathLike) -> list[StudyListing]:
    """Every study under `root` (as `find_studies` finds them; the shared store is none) with done/total counts
    of its stages and runs (a run is done when its final stage is). "Done" here is "has a done record": listing
    hashes no artefacts (that costs seconds per model file; `fsdfm verify` / `check_stage` do it). A root that
    does not exist lists nothing; an unreadable plan is skipped with a warning naming it."""
    if not Path(root).exists():
        return []
    out = []
    for sdir in find_studies(root):
        plan = read_plan_or_warn(sdir)
        if plan is None:
            continue
        done = {
            sid
            for sid in plan["stages"]
            if (read_record(stage_dir(sdir, sid), warn=False) or {}).get("status") == "done"
        }
        runs = [r.get("stage_id") for r in plan["runs"]]
        out.append(
            StudyListing(
                plan.get("name", sdir.name),
                str(sdir),
                len(done),
                len(plan["stages"]),
                sum(sid in done for sid in runs),
                len(runs),
            )
        )
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


BASE_COLUMNS = ("study", "run_id", "stage_id")
PROVENANCE_COLUMNS = ("commit", "dirty", "device", "host", "threads", "stage_wall_s", "end_time")

# How a stage's config sections are named in a run's row (`settings_columns`). A training stage's "optim" is what
# the spec calls `train:` (train.lr, train.steps); its method's own section ("distill", ...) and its plain keys are
# the method's settings (settings.shortcut, settings.h_distribution, settings.source); model/objective/scheduler/
# data keep their names. A sample stage's keys are sample.*, an evaluate stage's evaluate.* except its evaluator.
TRAIN_SECTIONS = {
    "optim": "train",
    "model": "model",
    "objective": "objective",
    "scheduler": "scheduler",
    "data": "data",
    "evaluator": "evaluator",
}


def _stage_role(kind: str) -> str:
    if kind.startswith("evaluate"):
        return "evaluate"
    return "sample" if kind == "sample" else "model"


def _stage_columns(config: dict, role: str, prefix: str) -> dict:
    out: dict = {}
    for key, value in config.items():
        if role == "model":
            name = TRAIN_SECTIONS.get(key, "settings") if isinstance(value, dict) else "settings"
            col = name if isinstance(value, dict) else f"settings.{key}"
        elif key in ("evaluator", "data"):
            col = key
        else:
            col = f"{role}.{key}"
        flat = _flatten(value, col + ".") if isinstance(value, dict) and value else {col: value}
        for k, v in flat.items():
            out.setdefault(prefix + k, tuple(v) if isinstance(v, list) else v)  # tuples: groupby needs hashables
    return out


def settings_columns(plan: dict, stage_id: str) -> dict:
    """The settings of stage `stage_id` and of every stage upstream of it, as namespaced columns.

    Walking from a run's final stage: an evaluate stage gives evaluate.* (n_samples, metrics.names, seed) and
    evaluator.* (name, kind); the sample stage it reads gives sample.* (steps, precision, rule, sampler); the model
    that sample stage reads gives train.* (its optimiser: lr, steps, batch_size), settings.* (its method's own
    section, e.g. distill: shortcut, h_distribution, K; and plain keys such as source), model.*, objective.*,
    scheduler.*, data.*. Stages further up are prefixed with the input name that reaches them
    (teacher.train.lr, teacher.settings.source). The first stage to give a name keeps it (data.* is the
    final stage's data when the stages disagree)."""
    stages = plan.get("stages") or {}
    out: dict = {}
    seen: set = set()
    todo = [(stage_id, "")]
    while todo:
        sid, prefix = todo.pop(0)
        st = stages.get(sid)
        if (sid, prefix) in seen or not isinstance(st, dict):
            continue
        seen.add((sid, prefix))
        role = _stage_role(str(st.get("kind", "")))
        for k, v in _stage_columns(st.get("config") or {}, role, prefix).items():
            out.setdefault(k, v)
        for name, dep in sorted((st.get("inputs") or {}).items()):
            dep_role = _stage_role(str((stages.get(dep) or {}).get("kind", "")))
            # the evaluated samples and the model that made them are the run's own: no prefix
            own = role != "model" and (dep_role == "sample" or name == "model")
            todo.append((dep, prefix if own else f"{prefix}{name}."))
    return out


@dataclass(frozen=True)
class DoneRun:
    """A run whose final stage is done: its study's plan and name, the run entry, the stage folder and record."""

    study: str
    plan: dict
    run: dict
    stage_dir: Path
    record: dict


def done_runs(path: str | os.PathLike, warn: bool = True):
    """Yield a `DoneRun` per run whose final stage is done, in the plans under `path` (each record read once,
    however many runs share it; corrupt ones skipped, with a warning where `warn`)."""
    for sdir in find_studies(path):
        plan = read_plan_or_warn(sdir)
        if plan is None:
            continue
        records: dict[str, dict | None] = {}
        for run in plan["runs"]:
            sid = run["stage_id"]
            if sid not in records:
                records[sid] = read_record(stage_dir(sdir, sid), warn=warn)
            rec = records[sid]
            if rec is not None and rec.get("status") == "done":
                yield DoneRun(plan.get("name", sdir.name), plan, run, stage_dir(sdir, sid), rec)


def load(path: str | os.PathLike):
    """One row per run whose final stage is done, as a pandas DataFrame.

    `path` is a study directory or a root holding many. Columns: study, run_id, stage_id; every run parameter
    (dotted names, e.g. "sampler.steps"); every entry of the final record's payload `metrics` (nested dicts
    flattened with dots; lists kept as objects; a metric whose name is also a parameter becomes
    "metrics.<name>"); the settings of the run's upstream stages (`settings_columns`: train.lr,
    settings.shortcut, settings.h_distribution, sample.precision, evaluator.name, ...; a name that is already a
    run parameter keeps the parameter's column), so every setting that differs between runs has a column;
    provenance: commit, dirty, device, host, threads (torch's intra-op threads), stage_wall_s (the
    stage's own run time), end_time. Corrupt or half-written
    record.json files are skipped with a warning naming the file, never read as results.
    """
    import pandas as pd  # lazy: job processes import fsdfm.records, only analysis loads tables

    rows: list[dict] = []
    param_cols: dict[str, None] = {}
    metric_cols: dict[str, None] = {}
    setting_cols: dict[str, None] = {}
    for done in done_runs(path):
        run, rec, sid = done.run, done.record, done.run["stage_id"]
        params = _flatten(run.get("params", {}))
        payload = rec.get("payload") or {}
        metrics = _flatten(payload.get("metrics") or {})
        row = {"study": done.study, "run_id": run["run_id"], "stage_id": sid}
        for k, v in params.items():
            row[k] = v
            param_cols[k] = None
        for k, v in metrics.items():
            col = k if k not in params and k not in BASE_COLUMNS and k not in PROVENANCE_COLUMNS else f"metrics.{k}"
            row[col] = v
            metric_cols[col] = None
        for k, v in settings_columns(done.plan, sid).items():
            if k in row or k in BASE_COLUMNS or k in PROVENANCE_COLUMNS:
                continue  # a run parameter (or metric) of that name already says it
            row[k] = v
            setting_cols[k] = None
        prov = rec.get("provenance", {})
        row.update(
            commit=prov.get("git_commit"),
            dirty=prov.get("git_dirty"),
            device=prov.get("device"),
            host=prov.get("hostname"),
            threads=prov.get("torch_threads"),
            stage_wall_s=prov.get("wall_s"),
            end_time=prov.get("end_time"),
        )
        rows.append(row)
    setting_cols = {k: None for k in setting_cols if k not in param_cols and k not in metric_cols}
    columns = list(BASE_COLUMNS) + list(param_cols) + list(metric_cols) + list(setting_cols) + list(PROVENANCE_COLUMNS)
    return pd.DataFrame(rows, columns=columns)


def load_records(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Every done record of the stages in the plans under `path` (optionally only of stage kind `kind`), each
    with "study" and "stage_dir" added. Corrupt records are skipped with a warning naming the file."""
    out = []
    for sdir in find_studies(path):
        plan = read_plan_or_warn(sdir)
        if plan is None:
            continue
        for sid, st in plan["stages"].items():
            if kind is not None and st.get("kind") != kind:
                continue
            d = stage_dir(sdir, sid)
            rec = read_record(d)
            if rec is None or rec.get("status") != "done":
                continue
            out.append({**rec, "study": plan.get("name", sdir.name), "stage_dir": str(d)})
    return out


def load_samples(path: str | os.PathLike):
    """One row per sample of every run whose final stage is done and wrote a per-sample table, as a DataFrame.

    `path` is a study directory or a root holding many. Columns: study, run_id, stage_id, every run parameter
    (as in `load`), then the table's own columns: sample (index in the run), length (tokens before the first
    EOS), nll / n_tokens / truncated (gen_ppl's summed NLL in nats, scored evaluator tokens, truncation),
    seq_nll / seq_n_tokens (gen_ppl_seq_mean's), entropy_nats, rep_n, oracle_nll (per token; oracle data) —
    each where the run recorded it. Token-pooled gen_ppl = exp(sum nll / sum n_tokens) over a run's rows.
    Runs without a table (recorded before tables existed) are skipped with one warning naming them.
    """
    import pandas as pd  # lazy: see load

    frames = []
    missing: list[str] = []
    for done in done_runs(path, warn=False):
        rec, run = done.record, done.run
        table = done.stage_dir / ((rec.get("payload") or {}).get("per_sample") or PER_SAMPLE)
        if not table.is_file():
            if rec.get("kind") in ("evaluate", "evaluate_data"):
                missing.append(run["run_id"])
            continue
        df = read_per_sample(table)
        head = {
            "study": done.study,
            "run_id": run["run_id"],
            "stage_id": run["stage_id"],
            **_flatten(run.get("params", {})),
        }
        frames.append(
            pd.concat([pd.DataFrame({k: [v] * len(df) for k, v in head.items()}, index=df.index), df], axis=1)
        )
    if missing:
        warnings.warn(
            f"load_samples: {len(missing)} finished run(s) have no {PER_SAMPLE} (recorded before per-sample "
            f"tables): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            stacklevel=2,
        )
    if not frames:
        return pd.DataFrame(columns=list(BASE_COLUMNS) + ["sample"])
    return pd.concat(frames, ignore_index=True)
