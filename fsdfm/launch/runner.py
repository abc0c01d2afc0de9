"""The plain stage runner: `run_stage(study_dir, stage_id)`, the one function every job executes, and the
picklable `StageJob` that submitit wraps around it.

Knows how one stage is run and recorded (inputs checked, lock taken, out_dir prepared, the stage function called,
record.json written through `fsdfm.records`); knows nothing of where it runs (executors, SLURM) or of waves. A job
process imports only this module's package and the module that registers the stage's kind (`resolve_kind`).

Checkpointable stage kinds run inside a `submitit.helpers.Checkpointable` (`CheckpointableStageJob`), so on
timeout/preemption (USR2) the job requeues itself; the stage function resumes from the checkpoints it keeps in
its out_dir. A job that is requeued from outside (`scontrol requeue`, node failure) simply starts `run_stage`
again, which finds the same out_dir (and breaks the dead attempt's lock: same SLURM job id). A run that finds a
stage locked by a live process (another run of the same study) says so, naming the pid, and waits for it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import shutil
import sys
import time
import traceback
from pathlib import Path

import submitit.helpers

from fsdfm.io import atomic_write_json, read_json, to_jsonable
from fsdfm.records import (
    ATTEMPTS,
    CONTROL_FILES,
    ERROR,
    PLAN,
    RECORD,
    RUNNING,
    SCHEMA_VERSION,
    STORE,
    SUBMITTED,
    LockInfo,
    StageCheck,
    artefact_manifest,
    check_stage,
    device_name,
    find_seeds,
    link_stages,
    loadavg_1min,
    now_iso,
    read_plan,
    read_record,
    record_digest,
    remove_stale_temp_files,
    seal,
    stage_dir,
    stage_lock,
    store_path,
    torch_threads,
)
from fsdfm.records.provenance import provenance
from fsdfm.fingerprint import check_data_unchanged
from fsdfm.registry import did_you_mean, discover
from fsdfm.progress import stage_progress
from fsdfm.tracking import log_final, stage_tracking
from fsdfm.launch.runtime import malloc_tuned, tune_malloc
from fsdfm.study.graph import STAGE_KINDS, PlanError, Stage, StageKind

ERROR_TAIL_LINES = 30
LOCK_POLL_S = 0.5  # how often a run that found a stage locked by a live process looks again


class StageInputError(RuntimeError):
    """A stage was started before one of its inputs was done."""


STAGE_MODULES_ENV = "FSDFM_STAGE_MODULES"

PACKAGE = __name__.split(".")[0]  # "fsdfm"

# Where fsdfm's own stage kinds are registered now (every module of each is imported: fsdfm.registry.discover). A
# plan.json written before issue 12's refactor names modules that are gone ("fsdfm.pipeline" for every method and
# evaluation stage); a job of such a study finds its kinds here.
KIND_MODULES = ("fsdfm.methods", "fsdfm.external")


def stage_modules_env(kinds: list[str]) -> dict[str, str]:
    """{module: import_root} of the registered `kinds` that live outside the fsdfm package (tests, user code).

    The driver hands this to its jobs (as FSDFM_STAGE_MODULES, JSON) from its own registry, so that what a job may
    import is decided by the process that registered the kinds, not by plan.json, a file anyone with write access
    to the results could edit."""
    out = {}
    for kind in sorted(set(kinds)):
        k = STAGE_KINDS.get(kind)
        if k.module.split(".")[0] != PACKAGE and k.import_root:
            out[k.module] = k.import_root
    return out


def _import_fsdfm_module(module: str, kind: str) -> None:
    """Import fsdfm's `module`; if it no longer exists or no longer registers `kind` (a hint from an older
    plan.json), import the modules that register every fsdfm stage kind today (`KIND_MODULES`)."""
    try:
        discover(module, submodules=False)
    except ModuleNotFoundError as e:
        if not e.name or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module exists but something it imports does not: that error is the message
    if kind not in STAGE_KINDS:
        discover(*KIND_MODULES)


def resolve_kind(kind: str, hint: dict | None = None) -> StageKind:
    """The registered `StageKind` named `kind`, importing the module that registers it if needed.

    A fresh job process has only imported fsdfm.launch; plan.json records, per kind, the module that registered
    it (`hint`). A job imports that module only if it is part of the fsdfm package, or if its driver granted it
    in FSDFM_STAGE_MODULES (`stage_modules_env`: module -> the sys.path entry to import it from), so a tampered
    plan.json cannot make a job import (run) any other module. A hinted fsdfm module that is gone or no longer
    registers the kind (a study planned by an older fsdfm) falls back to the modules that register fsdfm's kinds
    now (`KIND_MODULES`)."""
    if kind not in STAGE_KINDS and hint and hint.get("module"):
        module = str(hint["module"])
        try:
            granted = json.loads(os.environ.get(STAGE_MODULES_ENV) or "{}")
        except ValueError:
            granted = {}
        if not isinstance(granted, dict):
            granted = {}
        if module.split(".")[0] == PACKAGE:
            _import_fsdfm_module(module, kind)
        elif module in granted:
            root = str(granted[module])
            if root not in sys.path:
                sys.path.append(root)  # appended: never shadow installed packages
            discover(module, submodules=False)
        else:
            raise PlanError(
                f"plan.json: stage kind {kind!r} names module {module!r}, which is not part of the "
                f"{PACKAGE} package and was not granted by the driver ({STAGE_MODULES_ENV}); a job "
                f"imports only those"
            )
    return STAGE_KINDS.get(kind)


def run_stage(study_dir: str | os.PathLike, stage_id: str) -> dict:
    """Run one stage of the study in `study_dir` (what every job executes); returns its record.

    Reads the stage from plan.json; returns the existing record if the stage is done; checks that its inputs
    are done; takes the stage lock (if another live process holds it, says so on stderr, naming the pid, and
    waits until it is released: then the record it wrote is returned); removes temp files of dead writers
    (`remove_stale_temp_files`); writes running.json;
    clears out_dir of a non-checkpointable stage (a clean slate: a killed attempt's half-written artefacts
    must not leak into this one) while a checkpointable stage keeps its checkpoints; calls the stage function;
    writes record.json atomically, with the size and sha256 of every artefact it left (hashed once, here) and
    the digest of each input record it read. A stage found damaged or stale is redone: its record and damaged
    files are removed first (a stale checkpointable stage also loses its checkpoints: they came from the old
    inputs), and a line naming the files goes to stderr. On an exception, writes error.json and re-raises. The
    first call in a process tunes glibc malloc (`fsdfm.launch.runtime.tune_malloc`), so timings do not depend on what
    the process did before.
    """
    tune_malloc()
    study_dir = Path(study_dir)
    plan = read_plan(study_dir)
    if stage_id not in plan["stages"]:
        raise PlanError(f"{study_dir / PLAN}: no stage {stage_id!r}{did_you_mean(stage_id, list(plan['stages']))}")
    stage = Stage.from_dict(plan["stages"][stage_id], f"{study_dir / PLAN}: stages[{stage_id!r}]")
    kind = resolve_kind(stage.kind, plan.get("kinds", {}).get(stage.kind))
    out_dir = _relinked(study_dir, stage_id)
    if check_stage(out_dir).done:
        return read_record(out_dir)
    inputs, input_records = _done_inputs(study_dir, stage)

    rank = _global_rank()
    if rank > 0:
        # a multi-task (DDP) job runs this on every rank; rank 0 owns the lock, the markers and the record,
        # the other ranks only take part in the computation (and, by convention, write nothing to out_dir)
        return {"rank": rank, "payload": kind.fn(copy.deepcopy(stage.config), dict(inputs), out_dir)}

    def tell(holder: LockInfo) -> None:
        print(
            f"stage {stage_id} is locked by {holder.describe()}: waiting for it to finish", file=sys.stderr, flush=True
        )

    with stage_lock(out_dir, wait=True, poll_s=LOCK_POLL_S, on_wait=tell, study=plan["name"]):
        check = check_stage(out_dir)
        if check.done:  # finished while we were getting here
            return read_record(out_dir)
        if check.problems:
            print(
                f"stage {stage_id}: redoing it (and its dependents): {'; '.join(check.problems)}",
                file=sys.stderr,
                flush=True,
            )
            _discard_result(out_dir, check, kind.checkpointable)
        remove_stale_temp_files(out_dir)  # what killed attempts left half-written (e.g. an empty checkpoint temp)
        attempt = _next_attempt(out_dir)
        t0, started, load_start, cpu0 = time.time(), now_iso(), loadavg_1min(), _cpu_s()
        atomic_write_json(out_dir / RUNNING, {**_attempt_fields(stage, attempt, started), **_job_identity()})
        try:
            data_read = check_data_unchanged(stage)  # time of use: what the id holds is what is read
            if not kind.checkpointable:
                _clear_artefacts(out_dir)
            payload = _call_stage(plan, study_dir, stage, kind, inputs, out_dir)
            wall = time.time() - t0
            record = _record(plan, stage, out_dir, input_records, payload)
            loads = {"start": load_start, "end": loadavg_1min()}
            cpu_s = round(_cpu_s() - cpu0, 3)  # beside wall_s: under load wall_s grows, cpu_s does not
            prov = dict(loadavg_1min=loads, start_time=started, end_time=now_iso(), wall_s=wall, cpu_s=cpu_s)
            record["provenance"].update(prov, attempt=attempt)
            record = _sealed(record, data_read)
            atomic_write_json(out_dir / RECORD, record)
            for stale in (ERROR, SUBMITTED):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out_dir / stale)
            return record
        except Exception as e:
            _write_error(out_dir, stage, e, attempt, started)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out_dir / RUNNING)


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its waited-for children (os.times: portable)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _done_inputs(study_dir: Path, stage: Stage) -> tuple[dict[str, Path], dict[str, str | None]]:
    """({input name: its store folder}, {input name: its record's digest}); raises StageInputError naming the
    first input that is not done. The store folder is the same for every study sharing the input stage."""
    inputs: dict[str, Path] = {}
    input_records: dict[str, str | None] = {}
    for name, dep in stage.inputs.items():
        dep_dir = stage_dir(study_dir, dep)
        dep_check = check_stage(dep_dir)
        if not dep_check.done:
            why = f": {'; '.join(dep_check.problems)}" if dep_check.problems else f" ({dep_dir})"
            raise StageInputError(f"stage {stage.id}: input {name!r} (stage {dep}) is not done{why}")
        inputs[name] = store_path(dep_dir)
        input_records[name] = record_digest(dep_dir)
    return inputs, input_records


def _call_stage(plan: dict, study_dir: Path, stage: Stage, kind: StageKind, inputs: dict, out_dir: Path) -> dict:
    """The stage function's payload (JSON-ready), called on a copy of its config under the study's tracking."""
    ends = [r for r in plan.get("runs", []) if r.get("stage_id") == stage.id]  # the runs this stage ends
    runs = [r["run_id"] for r in ends]
    params = ends[0].get("params") if ends else None  # its hyperparameters beside the stage config
    with (
        stage_tracking(
            plan.get("tracking"), study_dir, stage.id, stage.kind, runs, config=stage.config, run_params=params
        ) as tracker,
        stage_progress(out_dir, stage.id),  # step and time left for `fsdfm status` and logs off a terminal
    ):
        payload = kind.fn(copy.deepcopy(stage.config), dict(inputs), out_dir)
        log_final(tracker, payload if isinstance(payload, dict) else {}, step=_final_step(stage.config))
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise TypeError(
            f"stage kind {stage.kind!r} returned {type(payload).__name__}; a stage function "
            "returns a dict (its record's payload, e.g. {'metrics': {...}})"
        )
    return to_jsonable(payload, where=f"payload of stage {stage.id}")


def _record(plan: dict, stage: Stage, out_dir: Path, input_records: dict, payload: dict) -> dict:
    """record.json of a stage that just finished (its provenance still lacks the attempt's times)."""
    return {
        "schema": SCHEMA_VERSION,
        "status": "done",
        "study": plan["name"],
        "stage_id": stage.id,
        "kind": stage.kind,
        "config": stage.config,
        "inputs": stage.inputs,
        "seeds": find_seeds(stage.config),
        "fingerprint": stage.fingerprint,  # code versions (kind, metrics) and data hashes: in the id
        "artefacts": artefact_manifest(out_dir),  # every artefact hashed once, at write (see sha256_file)
        "input_records": input_records,
        "payload": payload,
        "provenance": {
            **provenance(),
            "device": device_name(),
            "torch_threads": torch_threads(),
            "malloc_tuned": malloc_tuned(),
        },
    }


def _relinked(study_dir: Path, stage_id: str) -> Path:
    """The stage's folder `<study>/stages/<id>`, linked into the store again if its link was removed since the
    plan was written (`fsdfm clean`): a stage lives in the store, never as a real folder of one study."""
    out_dir = stage_dir(study_dir, stage_id)
    if not out_dir.exists() and (study_dir.parent / STORE).is_dir():
        link_stages(study_dir, [stage_id], study_dir.parent)
    return out_dir


def _sealed(record: dict, data_read: dict) -> dict:
    """The record with the data digests the stage checked (`data_read`) and the digest of its own content."""
    record = to_jsonable({**record, "data_read": data_read}, where=f"record of stage {record['stage_id']}")
    return seal(record)


def _attempt_fields(stage: Stage, attempt: int, started: str) -> dict:
    return {"stage_id": stage.id, "kind": stage.kind, "attempt": attempt, "start_time": started}


def _job_identity() -> dict:
    """Where this attempt runs (host, pid, SLURM/submitit job id): written to running.json and error.json."""
    return {k: v for k, v in provenance().items() if k in ("hostname", "pid", "slurm_job_id", "job_id")}


def _global_rank() -> int:
    """This task's rank in a multi-task job (SLURM, submitit local, torchrun); 0 when alone."""
    for var in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID", "RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _final_step(config: dict) -> int:
    """The step final metrics are logged at: a training stage's last step, else 0."""
    steps = (config.get("optim") or {}).get("steps")
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else 0


def _next_attempt(out_dir: Path) -> int:
    path = out_dir / ATTEMPTS
    try:
        n = int(path.read_text().strip() or 0) + 1
    except (FileNotFoundError, ValueError):
        n = 1
    path.write_text(f"{n}\n")
    return n


def _discard_result(out_dir: Path, check: StageCheck, checkpointable: bool) -> None:
    """Remove a damaged or stale result before redoing it: the record and the damaged files. A stale
    checkpointable stage also loses everything else (its checkpoints came from the old inputs); a damaged one
    keeps its checkpoints, so it resumes from them instead of training again (a non-checkpointable stage is
    cleared anyway)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / RECORD)
    if check.state == "stale" and checkpointable:
        _clear_artefacts(out_dir)
    for f in check.damaged_files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


def _clear_artefacts(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        if p.name in CONTROL_FILES:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _write_error(out_dir: Path, stage: Stage, e: BaseException, attempt: int, started: str) -> None:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    lines = "".join(tb).rstrip("\n").splitlines()
    err = {
        **_attempt_fields(stage, attempt, started),
        "time": now_iso(),
        "type": f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."),
        "message": str(e),
        "traceback_tail": lines[-ERROR_TAIL_LINES:],
        **_job_identity(),
    }
    with contextlib.suppress(Exception):  # never hide the stage's own exception behind a failed error report
        atomic_write_json(out_dir / ERROR, err)


def error_summary(out_dir: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        err = read_json(out_dir / ERROR)
        return f"{err['type']}: {err['message']}"
    return None


class StageJob:
    """The callable a submitit job runs: `run_stage(study_dir, stage_id)` (picklable by reference)."""

    def __init__(self, study_dir: str, stage_id: str):
        self.study_dir = str(study_dir)
        self.stage_id = stage_id

    def __call__(self) -> dict:
        # A driver started in the background by a non-interactive shell (`fsdfm run ... &`, nohup) has SIGINT
        # ignored, and its jobs inherit that; the driver cancels a job with SIGINT (_cancel_local_jobs), so the
        # job restores Python's default handler: the KeyboardInterrupt then unwinds run_stage and its lock.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_stage(self.study_dir, self.stage_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.study_dir!r}, {self.stage_id!r})"


class CheckpointableStageJob(StageJob, submitit.helpers.Checkpointable):
    """A StageJob that submitit requeues on timeout/preemption (USR2) instead of failing.

    `checkpoint()` (inherited) resubmits the same call; the state lives in the stage's out_dir, where the
    stage function saves checkpoints and resumes from them, so nothing but (study_dir, stage_id) is pickled."""


def job_for(sdir: Path, stage: Stage) -> StageJob:
    """The job object an executor submits for `stage`: checkpointable (requeued on timeout) when its kind is."""
    cls = CheckpointableStageJob if STAGE_KINDS.get(stage.kind).checkpointable else StageJob
    return cls(str(sdir), stage.id)
