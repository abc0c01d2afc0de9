"""The results layout: file names, stage folders, records, artefact checks and the one plan.json reader.

The only place (with the rest of `fsdfm.records`) that knows how a study sits on disk; it knows nothing of
stage functions, executors or the analysis. Layout (one directory per study, one per stage, content-addressed by
stage id):

    <root>/<study>/plan.json                      the expanded study: stages, runs, kinds (written atomically)
    <root>/<study>/external.json                  stages and runs of `fsdfm eval` (merged into the plan on read)
    <root>/<study>/jobs/                          submitit's job folders (pickles, stdout/stderr logs)
    <root>/<study>/stages/<stage_id>/record.json  the finished record: {"status": "done", ...}
                                     running.json  while an attempt runs: host, pid, job id, start time
                                     error.json    the last failed attempt: exception type, message, traceback tail
                                     submitted.json the cluster job that will run it (executor, job id, time)
                                     .lock         exclusive lock (O_CREAT|O_EXCL): host, pid, job id
                                     per_sample.csv evaluate stages: one row per sample (`load_samples`)
                                     *             the stage's own artefacts and checkpoints
    <root>/_stages/<stage_id>/                    the shared store the study's stages/<id> links into (store.py)

A stage is done iff its record.json parses, has "status": "done", matches its own digest (a record carries the
sha256 of its content, so a hand-edited value is found; records written before digests have none), every artefact it lists under "artefacts"
(path -> size and sha256 of every file the stage left in its folder, see `artefact_manifest`) still has that
size and content, and every input record it read (sha256 under "input_records") is still the current one (an
input that was redone since makes it stale). `check_stage` says which of these fails, naming the file. The
record is written last and atomically (`fsdfm.io.atomic_write`), so a process killed at any point leaves
either no record or a complete one; a half-written record can only be a stray temp file, never record.json.
The keys of a record are `fsdfm.records.schema.StageRecord`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fsdfm.io import read_json, sha256_file
from fsdfm.records.schema import SCHEMA_VERSION  # noqa: F401 - part of the layout's face
from fsdfm.study.graph import (
    PlanError,
    StudyPlan,
)  # a broken plan.json is an inconsistent plan, as the stage graph says

PLAN = "plan.json"
STAGES = "stages"
JOBS = "jobs"
RECORD = "record.json"
RUNNING = "running.json"
ERROR = "error.json"
SUBMITTED = "submitted.json"
EXTERNAL = "external.json"  # `fsdfm eval` runs beside plan.json (fsdfm.external)
LOCK = ".lock"
STORE = "_stages"  # the shared stage store under the results root (fsdfm.records.store)
ATTEMPTS = ".attempts"
# files of the machinery, not of the stage: kept when a non-checkpointable stage's out_dir is cleared
CONTROL_FILES = frozenset({RECORD, RUNNING, ERROR, SUBMITTED, LOCK, LOCK + ".break", ATTEMPTS})


# ------------------------------------------------------------------------------------------------- layout
def study_dir(root: str | os.PathLike, study: str) -> Path:
    return Path(root) / study


def stage_dir(study: str | os.PathLike, stage_id: str) -> Path:
    return Path(study) / STAGES / stage_id


DIGEST = "digest"  # the record's own key: sha256 of the rest of its content (`content_digest`)


def content_digest(rec: dict) -> str:
    """ "sha256:<hex>" of a record's content without its `digest` key, as canonical JSON (sorted keys, no
    whitespace; NaN kept, as records hold measured values). JSON numbers read back as the same floats, so the
    digest of the written record and of the record read back agree; any edit of a value changes it."""
    body = {k: v for k, v in rec.items() if k != DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(rec: dict) -> dict:
    """`rec` (JSON-ready) with its `digest` added: what the runner writes as record.json."""
    return {**rec, DIGEST: content_digest(rec)}


def digest_problem(sdir: Path, rec: dict) -> str | None:
    """A line naming record.json when its content no longer matches its digest; None when it matches or when the
    record has no digest (written before records carried one: still read, as the committed results are)."""
    want = rec.get(DIGEST)
    if want is None or want == content_digest(rec):
        return None
    return f"{Path(sdir) / RECORD}: its content does not match its digest (edited after it was written)"


def read_record(sdir: Path, warn: bool = True, check_digest: bool = True) -> dict | None:
    """The record in stage directory `sdir`, or None when there is none. A record that does not parse (or is
    not a JSON object), or whose content no longer matches its digest (`check_digest`: a hand-edited metric
    must not reach a report), is treated as absent, with a `warnings.warn` naming the file when `warn`."""
    path = Path(sdir) / RECORD
    try:
        rec = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if warn:
            warnings.warn(f"skipping corrupt or half-written record {path}: {e}", stacklevel=2)
        return None
    if not isinstance(rec, dict):
        if warn:
            warnings.warn(f"skipping record {path}: not a JSON object", stacklevel=2)
        return None
    if check_digest:
        problem = digest_problem(sdir, rec)
        if problem is not None:
            if warn:
                warnings.warn(f"skipping record {problem}; `fsdfm run` redoes the stage", stacklevel=2)
            return None
    return rec


def is_done(sdir: Path) -> bool:
    """A stage is done iff its record.json parses, has status "done" and `check_stage` finds its artefacts and
    input records as recorded."""
    return check_stage(sdir).done


# ------------------------------------------------------------------------------------------- artefacts
# Not artefacts of a stage: the machinery's control files, hidden files (temp files of atomic writes, locks,
# .attempts), logs, and checkpoints under ckpt/ -- resumption state that no other stage reads; a damaged
# checkpoint must not throw away a finished training (the stage would restart from scratch).
NOT_ARTEFACT_DIRS = frozenset({"ckpt"})
LOG_SUFFIXES = (".log", ".out", ".err")


def artefact_paths(sdir: Path) -> list[Path]:
    """Every file the stage left in `sdir` that `artefact_manifest` covers (sorted), whatever its name: a new
    artefact a stage starts writing (e.g. a per-sample table) is covered without being declared."""
    sdir = Path(sdir)
    out = []
    for p in sorted(sdir.rglob("*")):
        rel = p.relative_to(sdir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if (
            (len(rel.parts) == 1 and p.name in CONTROL_FILES)
            or rel.parts[0] in NOT_ARTEFACT_DIRS
            or p.name.endswith(LOG_SUFFIXES)
        ):
            continue
        out.append(p)
    return out


def artefact_manifest(sdir: Path) -> dict[str, dict]:
    """{relative posix path: {"size": bytes, "sha256": hex}} of every `artefact_paths` file of `sdir`."""
    sdir = Path(sdir)
    return {
        p.relative_to(sdir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in artefact_paths(sdir)
    }


def record_digest(sdir: Path) -> str | None:
    """sha256 of the bytes of `sdir`/record.json (None when there is none): which result a dependent read.
    (The memo of `sha256_file` cannot go stale here: a record is only ever replaced, never rewritten in place.)"""
    try:
        return sha256_file(Path(sdir) / RECORD)
    except OSError:
        return None


@dataclass(frozen=True)
class StageCheck:
    """What `check_stage` found in one stage directory.

    state: "done" (record done; artefacts and input records as recorded), "missing" (no done record),
        "damaged" (an artefact is missing, has another size or another sha256) or "stale" (an input was redone
        after this stage read it). problems: one line per finding, each naming the file.
    verified: whether the record lists its artefacts (records written before artefact hashing do not).
    damaged_files: the paths of the damaged artefacts (state "damaged").
    """

    sdir: str
    state: str
    problems: tuple = ()
    verified: bool = False
    damaged_files: tuple = ()

    @property
    def done(self) -> bool:
        return self.state == "done"


def check_stage(sdir: Path) -> StageCheck:
    """Compare a stage's done record with its folder: artefact sizes and sha256s, and its inputs' current records.

    Sizes are compared first (a truncation costs no hashing); then every artefact is hashed (see `sha256_file`
    for the cost). Input records are found beside `sdir` (the study's stages/ folder)."""
    sdir = Path(sdir)
    rec = read_record(sdir, warn=False, check_digest=False)
    if rec is None or rec.get("status") != "done":
        return StageCheck(str(sdir), "missing")
    edited = digest_problem(sdir, rec)
    if edited is not None:
        return StageCheck(str(sdir), "damaged", (edited,), isinstance(rec.get("artefacts"), dict))
    manifest = rec.get("artefacts")
    problems, damaged = [], []
    if isinstance(manifest, dict):
        for rel, want in sorted(manifest.items()):
            p = sdir / rel
            want = want if isinstance(want, dict) else {}
            try:
                size = p.stat().st_size
            except OSError:
                problems.append(f"{p}: missing (recorded {want.get('size')} bytes)")
                damaged.append(str(p))
                continue
            if size != want.get("size"):
                problems.append(f"{p}: {size} bytes, recorded {want.get('size')} (truncated or rewritten)")
            elif sha256_file(p) != want.get("sha256"):
                problems.append(
                    f"{p}: sha256 {sha256_file(p)[:12]} differs from the recorded "
                    f"{str(want.get('sha256'))[:12]} (same size: overwritten)"
                )
            else:
                continue
            damaged.append(str(p))
    if problems:
        return StageCheck(str(sdir), "damaged", tuple(problems), True, tuple(damaged))
    stale = []
    for name, want in sorted((rec.get("input_records") or {}).items()):
        dep = (rec.get("inputs") or {}).get(name)
        dep_dir = sdir.parent / str(dep)
        if dep is None or record_digest(dep_dir) != want:
            stale.append(f"{dep_dir / RECORD}: input {name!r} was redone (or removed) after this stage read it")
    if stale:
        return StageCheck(str(sdir), "stale", tuple(stale), isinstance(manifest, dict))
    return StageCheck(str(sdir), "done", (), isinstance(manifest, dict))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------- the plan
def read_plan(study_dir: str | os.PathLike) -> dict:
    """plan.json of `study_dir` as a dict, with the `fsdfm eval` runs of external.json merged in (a clear error
    when it is missing or broken: FileNotFoundError, or PlanError naming the file). Every reader of a plan goes
    through here (or `read_plan_or_warn`), so that no reader misses the external runs."""
    path = Path(study_dir) / PLAN
    try:
        plan = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no study plan here (execute() writes it)") from None
    except ValueError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(plan, dict) or not {"name", "stages", "runs"} <= set(plan):
        raise PlanError(f"{path}: not a study plan (needs name, stages, runs)")
    return merge_external(Path(study_dir), plan)


def read_study_plan(study_dir: str | os.PathLike) -> StudyPlan:
    """`read_plan` as a validated `StudyPlan`; a plan.json that parses but does not describe a plan (wrong types,
    a missing key) is a PlanError naming the file, like any other broken plan."""
    where = str(Path(study_dir) / PLAN)
    plan = read_plan(study_dir)
    try:
        return StudyPlan.from_dict(plan, where)
    except PlanError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise PlanError(f"{where}: not a valid study plan ({type(e).__name__}: {e})") from None


def read_plan_or_warn(sdir: Path) -> dict | None:
    """`read_plan` for the readers of many studies (`load`, `list_studies`): an unreadable plan is skipped with a
    warning naming it (None), never an error that hides the other studies."""
    try:
        plan = read_json(Path(sdir) / PLAN)
        if not isinstance(plan, dict) or "runs" not in plan or "stages" not in plan:
            raise ValueError("not a study plan (needs 'stages' and 'runs')")
        return merge_external(Path(sdir), plan)
    except (OSError, ValueError) as e:
        warnings.warn(f"skipping study {sdir}: unreadable {PLAN}: {e}", stacklevel=3)
        return None


def merge_external(sdir: Path, plan: dict) -> dict:
    """`plan` (a plan.json dict) with the external stages and runs of `sdir`/external.json added; an external
    stage whose inputs are not in the plan any more is left out with a warning."""
    path = Path(sdir) / EXTERNAL
    if not path.is_file():
        return plan
    try:
        ext = json.loads(path.read_text())
        stages, runs = dict(ext["stages"]), list(ext["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"skipping {path}: unreadable ({e})", stacklevel=2)
        return plan
    keep = {sid: st for sid, st in stages.items() if set((st.get("inputs") or {}).values()) <= set(plan["stages"])}
    if len(keep) < len(stages):
        warnings.warn(
            f"{path}: {len(stages) - len(keep)} external evaluation(s) read an evaluator this plan no "
            "longer has; not shown (re-run fsdfm eval)",
            stacklevel=2,
        )
    plan = dict(plan)
    plan["stages"] = {**plan["stages"], **keep}
    have = {r["run_id"] for r in plan["runs"]}
    plan["runs"] = list(plan["runs"]) + [r for r in runs if r["stage_id"] in keep and r["run_id"] not in have]
    kinds = dict(plan.get("kinds") or {})
    kinds.update(ext.get("kinds") or {})
    plan["kinds"] = kinds
    return plan
