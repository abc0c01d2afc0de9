"""Run a study's stages: in-process, as local processes, or as SLURM job arrays.

The work of a stage is the plain function `run_stage(study_dir, stage_id)`; executors only decide where it
runs. `execute(plan, root, executor=...)` writes plan.json, then walks `waves(plan)`:

* "debug": in this process, one stage after another (tests, pdb). No submitit here: its DebugExecutor opens
  pdb on a failing job, which under pytest turns the job's exception into an OSError about stdin.
* "local": one submitit LocalExecutor job (a process) per stage, one wave at a time, at most `max_parallel`
  at once (LocalExecutor has no parallelism cap of its own). `cluster="local"` is always explicit: submitit's
  auto-detection picks SLURM as soon as `srun` is on PATH. `timeout_min` is always set (an int; the local
  default is 2 minutes).
* "slurm": one job array per (wave, resource class, set of input jobs), with partition/GPUs/CPUs/memory/time
  from a cluster profile (slurm/*.yaml), and `--dependency=afterok:<input jobs>` (+ `--kill-on-invalid-dep=yes`)
  between waves, so `execute(..., wait=False)` submits the whole study and returns. `wait=True` polls the cluster
  (sacct, else squeue) and the stage files, never `job.result()`: a job that dies without writing its result
  pickle would make that hang forever.

Checkpointable stage kinds run inside a `submitit.helpers.Checkpointable`, so on timeout/preemption (USR2)
the job requeues itself; the stage function resumes from the checkpoints it keeps in its out_dir. A job that
is requeued from outside (`scontrol requeue`, node failure) simply starts `run_stage` again, which finds the
same out_dir (and breaks the dead attempt's lock: same SLURM job id).

`status(study_dir)` reports each stage as done / running / failed (with the error's last lines, or the SLURM
state of a job that ended without a record) / blocked (behind a failed input) / pending; it asks the scheduler
about submitted jobs.

The driver (`execute`) treats SIGTERM and SIGHUP like Ctrl-C (`signals_interrupt`): the local executor cancels its
jobs, kills what they started and breaks their locks; an inline stage unwinds and releases its lock. A run that
finds a stage locked by a live process (another run of the same study) says so, naming the pid, and waits for it.
"""

from __future__ import annotations

import contextlib
import functools
import copy
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit
import submitit.helpers

from fsdfm.registry import Registry, did_you_mean
from fsdfm.results import (
    ATTEMPTS, CONTROL_FILES, ERROR, JOBS, PLAN, RECORD, RUNNING, SCHEMA_VERSION, SUBMITTED, LockInfo, StageCheck,
    artefact_manifest, atomic_write_json, break_stale_lock, check_stage, device, find_seeds, is_done, loadavg_1min,
    lock_holder, now_iso, pid_alive, provenance, read_json, read_record, record_digest, remove_stale_temp_files,
    stage_dir, stage_lock, study_dir as _study_dir, to_jsonable, torch_threads,
)
from fsdfm.results import _pid_start
from fsdfm.runtime import malloc_tuned, tune_malloc
from fsdfm.study.graph import STAGE_KINDS, PlanError, Stage, StageKind, StudyPlan, waves
from fsdfm.store import store_path

ERROR_TAIL_LINES = 30
LOCK_POLL_S = 0.5  # how often a run that found a stage locked by a live process looks again


class StageInputError(RuntimeError):
    """A stage was started before one of its inputs was done."""


# ------------------------------------------------------------------------------------------- one stage
def read_plan(study_dir: str | os.PathLike) -> dict:
    """plan.json of `study_dir` as a dict (a clear error when it is missing or broken)."""
    path = Path(study_dir) / PLAN
    try:
        plan = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no study plan here (execute() writes it)") from None
    except ValueError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(plan, dict) or not {"name", "stages", "runs"} <= set(plan):
        raise PlanError(f"{path}: not a study plan (needs name, stages, runs)")
    from fsdfm.external import merge_external

    return merge_external(Path(study_dir), plan)  # `fsdfm eval` runs live beside plan.json (fsdfm.external)


STAGE_MODULES_ENV = "FSDFM_STAGE_MODULES"
PACKAGE = __name__.split(".")[0]  # "fsdfm"


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


def resolve_kind(kind: str, hint: dict | None = None) -> StageKind:
    """The registered `StageKind` named `kind`, importing the module that registers it if needed.

    A fresh job process has only imported fsdfm.launch; plan.json records, per kind, the module that registered
    it (`hint`). A job imports that module only if it is part of the fsdfm package, or if its driver granted it
    in FSDFM_STAGE_MODULES (`stage_modules_env`: module -> the sys.path entry to import it from), so a tampered
    plan.json cannot make a job import (run) any other module."""
    if kind not in STAGE_KINDS and hint and hint.get("module"):
        module = str(hint["module"])
        try:
            granted = json.loads(os.environ.get(STAGE_MODULES_ENV) or "{}")
        except ValueError:
            granted = {}
        if not isinstance(granted, dict):
            granted = {}
        if module.split(".")[0] == PACKAGE:
            importlib.import_module(module)
        elif module in granted:
            root = str(granted[module])
            if root not in sys.path:
                sys.path.append(root)  # appended: never shadow installed packages
            importlib.import_module(module)
        else:
            raise PlanError(f"plan.json: stage kind {kind!r} names module {module!r}, which is not part of the "
                            f"{PACKAGE} package and was not granted by the driver ({STAGE_MODULES_ENV}); a job "
                            f"imports only those")
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
    first call in a process tunes glibc malloc (`fsdfm.runtime.tune_malloc`), so timings do not depend on what
    the process did before.
    """
    tune_malloc()
    study_dir = Path(study_dir)
    plan = read_plan(study_dir)
    if stage_id not in plan["stages"]:
        raise PlanError(f"{study_dir / PLAN}: no stage {stage_id!r}"
                        f"{did_you_mean(stage_id, list(plan['stages']))}")
    stage = Stage.from_dict(plan["stages"][stage_id], f"{study_dir / PLAN}: stages[{stage_id!r}]")
    kind = resolve_kind(stage.kind, plan.get("kinds", {}).get(stage.kind))
    out_dir = stage_dir(study_dir, stage_id)
    if check_stage(out_dir).done:
        return read_record(out_dir)
    inputs: dict[str, Path] = {}
    input_records: dict[str, str | None] = {}
    for name, dep in stage.inputs.items():
        dep_dir = stage_dir(study_dir, dep)
        dep_check = check_stage(dep_dir)
        if not dep_check.done:
            why = f": {'; '.join(dep_check.problems)}" if dep_check.problems else f" ({dep_dir})"
            raise StageInputError(f"stage {stage_id}: input {name!r} (stage {dep}) is not done{why}")
        inputs[name] = store_path(dep_dir)  # the store folder: the same for every study sharing this stage
        input_records[name] = record_digest(dep_dir)

    rank = _global_rank()
    if rank > 0:
        # a multi-task (DDP) job runs this on every rank; rank 0 owns the lock, the markers and the record,
        # the other ranks only take part in the computation (and, by convention, write nothing to out_dir)
        return {"rank": rank, "payload": kind.fn(copy.deepcopy(stage.config), dict(inputs), out_dir)}

    def tell(holder: LockInfo) -> None:
        print(f"stage {stage_id} is locked by {holder.describe()}: waiting for it to finish", file=sys.stderr,
              flush=True)

    with stage_lock(out_dir, wait=True, poll_s=LOCK_POLL_S, on_wait=tell):
        check = check_stage(out_dir)
        if check.done:  # finished while we were getting here
            return read_record(out_dir)
        if check.problems:
            print(f"stage {stage_id}: redoing it (and its dependents): {'; '.join(check.problems)}",
                  file=sys.stderr, flush=True)
            _discard_result(out_dir, check, kind.checkpointable)
        remove_stale_temp_files(out_dir)  # what killed attempts left half-written (e.g. an empty checkpoint temp)
        attempt = _next_attempt(out_dir)
        t0, started, load_start = time.time(), now_iso(), loadavg_1min()
        running = {"stage_id": stage_id, "kind": stage.kind, "attempt": attempt, "start_time": started,
                   **{k: v for k, v in provenance().items() if k in ("hostname", "pid", "slurm_job_id", "job_id")}}
        atomic_write_json(out_dir / RUNNING, running)
        try:
            if not kind.checkpointable:
                _clear_artefacts(out_dir)
            from fsdfm.tracking import log_final, stage_tracking
            runs = [r["run_id"] for r in plan.get("runs", []) if r.get("stage_id") == stage_id]
            with stage_tracking(plan.get("tracking"), study_dir, stage_id, stage.kind, runs) as tracker:
                payload = kind.fn(copy.deepcopy(stage.config), dict(inputs), out_dir)
                log_final(tracker, payload if isinstance(payload, dict) else {}, step=_final_step(stage.config))
            if payload is None:
                payload = {}
            if not isinstance(payload, dict):
                raise TypeError(f"stage kind {stage.kind!r} returned {type(payload).__name__}; a stage function "
                                "returns a dict (its record's payload, e.g. {'metrics': {...}})")
            payload = to_jsonable(payload, where=f"payload of stage {stage_id}")
            wall = time.time() - t0
            artefacts = artefact_manifest(out_dir)  # every artefact hashed once, at write (see sha256_file)
            record = {
                "schema": SCHEMA_VERSION,
                "status": "done",
                "study": plan["name"],
                "stage_id": stage_id,
                "kind": stage.kind,
                "config": stage.config,
                "inputs": stage.inputs,
                "seeds": find_seeds(stage.config),
                "fingerprint": stage.fingerprint,  # code versions (kind, metrics) and data hashes: in the id
                "artefacts": artefacts,
                "input_records": input_records,
                "payload": payload,
                "provenance": {**provenance(), "device": device(), "torch_threads": torch_threads(),
                               "malloc_tuned": malloc_tuned(),
                               "loadavg_1min": {"start": load_start, "end": loadavg_1min()},
                               "start_time": started, "end_time": now_iso(), "wall_s": wall, "attempt": attempt},
            }
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
        "stage_id": stage.id, "kind": stage.kind, "attempt": attempt, "start_time": started, "time": now_iso(),
        "type": f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."),
        "message": str(e),
        "traceback_tail": lines[-ERROR_TAIL_LINES:],
        **{k: v for k, v in provenance().items() if k in ("hostname", "pid", "slurm_job_id", "job_id")},
    }
    with contextlib.suppress(Exception):  # never hide the stage's own exception behind a failed error report
        atomic_write_json(out_dir / ERROR, err)


def _error_summary(out_dir: Path) -> str | None:
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
        return run_stage(self.study_dir, self.stage_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.study_dir!r}, {self.stage_id!r})"


class CheckpointableStageJob(StageJob, submitit.helpers.Checkpointable):
    """A StageJob that submitit requeues on timeout/preemption (USR2) instead of failing.

    `checkpoint()` (inherited) resubmits the same call; the state lives in the stage's out_dir, where the
    stage function saves checkpoints and resumes from them, so nothing but (study_dir, stage_id) is pickled."""


# -------------------------------------------------------------------------------------------- summaries
@dataclass(frozen=True)
class ExecutionSummary:
    """What `execute`/`wait_for` saw: stage ids by outcome.

    done: finished in this call. skipped: already done, not submitted. failed: id -> "Type: message".
    blocked: not run because an input failed. pending: submitted or queued but not finished when the call
    returned (wait=False, or a timeout). submitted: id -> job id of every stage handed to an executor."""

    study_dir: str
    done: tuple = ()
    skipped: tuple = ()
    failed: dict = field(default_factory=dict)
    blocked: tuple = ()
    pending: tuple = ()
    submitted: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.pending

    def format(self) -> str:
        out = [f"{self.study_dir}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
               f"{len(self.failed)} failed, {len(self.blocked)} blocked, {len(self.pending)} pending"]
        out += [f"  failed  {sid}: {msg}" for sid, msg in self.failed.items()]
        out += [f"  blocked {sid} (an input failed)" for sid in self.blocked]
        return "\n".join(out)


class _Tally:
    """Mutable outcome lists while executing; frozen into an ExecutionSummary at the end."""

    def __init__(self, study_dir: Path):
        self.study_dir = study_dir
        self.done: list[str] = []
        self.skipped: list[str] = []
        self.failed: dict[str, str] = {}
        self.blocked: list[str] = []
        self.pending: list[str] = []
        self.submitted: dict[str, str] = {}

    def bad(self, stage: Stage) -> bool:
        """Whether an input of `stage` failed or was blocked (so `stage` cannot run)."""
        return any(d in self.failed or d in self.blocked for d in stage.inputs.values())

    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(str(self.study_dir), tuple(self.done), tuple(self.skipped), dict(self.failed),
                                tuple(self.blocked), tuple(self.pending), dict(self.submitted))


def _already_done(tally: _Tally, sdir: Path, stage: Stage) -> bool:
    """Whether an executor may skip `stage`: done by `check_stage`, and no input of it is (re)run in this call
    (a dependent of a redone stage read the old result; on SLURM the input has not even run yet). A damaged
    or stale stage is announced with the files that make it so."""
    if any(d in tally.submitted or d in tally.done for d in stage.inputs.values()):
        return False
    check = check_stage(stage_dir(sdir, stage.id))
    if check.problems:
        print(f"{stage.id}: {check.state}, redoing it: {'; '.join(check.problems)}", file=sys.stderr, flush=True)
    return check.done


# ---------------------------------------------------------------------------------------------- profiles
# profile keys -> what they mean; mapped to submitit's SlurmExecutor parameters in `_slurm_parameters`
PROFILE_KEYS = {
    "partition", "timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "account", "qos", "constraint",
    "exclude", "nodes", "tasks_per_node", "signal_delay_s", "array_parallelism", "setup", "additional_parameters",
    "max_num_timeout", "comment",
}
PROFILE_SECTIONS = {"name", "description", "executor", "defaults", "resources"}
DEFAULT_TIMEOUT_MIN = 60
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # the local default (2 min) would kill any real stage


def _check_keys(d: dict, where: str) -> None:
    for k in d:
        if k not in PROFILE_KEYS:
            raise ValueError(f"{where}: unknown key {k!r}{did_you_mean(k, sorted(PROFILE_KEYS))}; "
                             f"allowed: {', '.join(sorted(PROFILE_KEYS))}")


def load_profile(profile: str | os.PathLike | dict | None, overrides: dict | None = None) -> dict:
    """A cluster profile: {"defaults": {...}, "resources": {class: {...}}} with `overrides` applied.

    `profile` is a dict, a YAML path, or a name under slurm/ ("local" -> slurm/local.yaml). `overrides` are
    CLI-style: "timeout_min": 30 applies to every resource class; "gpu.timeout_min": 120 (or
    "resources.gpu.timeout_min") to one. Unknown keys are errors naming the file and the allowed keys."""
    if profile is None:
        prof, where = {}, "<no profile>"
    elif isinstance(profile, dict):
        prof, where = copy.deepcopy(profile), "<profile dict>"
    else:
        path = Path(profile)
        if not path.exists() and path.suffix == "" and len(path.parts) == 1:
            path = Path(__file__).resolve().parents[1] / "slurm" / f"{profile}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"cluster profile {profile!r} not found (looked for {path})")
        import yaml

        prof, where = yaml.safe_load(path.read_text()) or {}, str(path)
    if not isinstance(prof, dict):
        raise ValueError(f"{where}: a cluster profile is a mapping with 'defaults' and 'resources'")
    for k in prof:
        if k not in PROFILE_SECTIONS:
            raise ValueError(f"{where}: unknown section {k!r}{did_you_mean(k, sorted(PROFILE_SECTIONS))}; "
                             f"allowed: {', '.join(sorted(PROFILE_SECTIONS))}")
    prof.setdefault("defaults", {})
    prof.setdefault("resources", {})
    _check_keys(prof["defaults"] or {}, f"{where}: defaults")
    for cls, params in prof["resources"].items():
        _check_keys(params or {}, f"{where}: resources.{cls}")
        prof["resources"][cls] = params or {}
    prof["overrides"] = {}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if parts[0] == "resources":
            parts = parts[1:]
        if len(parts) == 1:
            _check_keys({parts[0]: value}, f"override {key!r}")
            prof["overrides"][parts[0]] = value
        elif len(parts) == 2:
            _check_keys({parts[1]: value}, f"override {key!r}")
            prof["resources"].setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ValueError(f"override {key!r}: expected KEY or CLASS.KEY")
    prof["where"] = where
    return prof


def resources_for(profile: dict, resource_class: str) -> dict:
    """The merged parameters of one resource class: defaults < resources[class] < plain overrides.

    A class the profile does not list is an error, except "cpu", which falls back to the defaults (a GPU
    stage must never silently land on a CPU partition)."""
    classes = profile.get("resources", {})
    if resource_class not in classes and resource_class != "cpu":
        raise ValueError(f"{profile.get('where', 'cluster profile')}: no resources.{resource_class} for stages "
                         f"that need {resource_class!r}; profile has: {', '.join(sorted(classes)) or 'none'}")
    return {**profile.get("defaults", {}), **classes.get(resource_class, {}), **profile.get("overrides", {})}


def _slurm_parameters(res: dict) -> dict:
    """Profile keys -> submitit SlurmExecutor parameters."""
    p = {k: v for k, v in res.items() if k not in ("timeout_min", "mem_gb", "tasks_per_node", "max_num_timeout")}
    p["time"] = int(res.get("timeout_min", DEFAULT_TIMEOUT_MIN))
    if "mem_gb" in res:
        mem = float(res["mem_gb"])
        p["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if "tasks_per_node" in res:
        p["ntasks_per_node"] = res["tasks_per_node"]
    return p


def _source_setup(plan: StudyPlan | None = None) -> list[str]:
    """Shell lines that make a job import this very fsdfm source tree (provenance: the commit we record) and
    grant it the modules of `plan`'s stage kinds that live outside fsdfm (`stage_modules_env`)."""
    root = str(Path(__file__).resolve().parents[1])
    lines = [f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    granted = stage_modules_env([s.kind for s in plan.stages.values()]) if plan is not None else {}
    if granted:
        lines.append(f"export {STAGE_MODULES_ENV}={shlex.quote(json.dumps(granted, sort_keys=True))}")
    return lines


# --------------------------------------------------------------------------------------------- executors
def write_plan(plan: StudyPlan, root: str | os.PathLike) -> Path:
    """Write root/<plan.name>/plan.json atomically and link its stages into the shared store
    (root/_stages/<id>, see `fsdfm.store`); returns the study directory."""
    from fsdfm.store import STORE, link_stages

    if plan.name == STORE:
        raise PlanError(f"study name {STORE!r} is reserved: it is the shared stage store under the results root")
    sdir = _study_dir(root, plan.name)
    sdir.mkdir(parents=True, exist_ok=True)
    link_stages(sdir, list(plan.stages), root)  # before the plan: a job never sees a plan without its links
    atomic_write_json(sdir / PLAN, plan.to_dict())
    return sdir


EXECUTORS: Registry[Callable[..., ExecutionSummary]] = Registry("executor")


def execute(plan: StudyPlan, root: str | os.PathLike, executor: str = "local",
            profile: str | os.PathLike | dict | None = None, wait: bool = True, max_parallel: int | None = None,
            timeout_s: float | None = None, poll_s: float = 1.0) -> ExecutionSummary:
    """Run every stage of `plan` that is not done yet; returns what happened.

    root/<plan.name>/plan.json is written first (atomically). Stages already done are skipped (not
    submitted). A stage whose input failed is "blocked". executor: "debug" (in-process), "local" (submitit
    local processes; `max_parallel` at once, default 1) or "slurm" (job arrays with afterok dependencies;
    `wait=False` returns once all is submitted; `max_parallel` caps each array). `profile`: a cluster profile
    (see `load_profile`). `timeout_s` bounds the wait (pending stages are reported, not raised).
    """
    run = EXECUTORS.get(executor)
    if not isinstance(plan, StudyPlan):
        raise TypeError(f"execute() needs a StudyPlan, got {type(plan).__name__}")
    plan.validate()
    kinds = {s.kind for s in plan.stages.values()}
    for kind in sorted(kinds):
        k = STAGE_KINDS.get(kind)  # an unknown kind fails here, before anything is written or submitted
        if executor != "debug" and k.module == "__main__":
            raise ValueError(f"stage kind {kind!r} is defined in __main__, which a job process cannot import; "
                             "define it in an importable module (or use executor='debug')")
    sdir = write_plan(plan, root)
    with signals_interrupt():
        return run(plan, sdir, profile=load_profile(profile), wait=wait, max_parallel=max_parallel,
                   timeout_s=timeout_s, poll_s=poll_s)


class DriverInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the driver. A KeyboardInterrupt, so that it is handled exactly like Ctrl-C: the
    local executor cancels its jobs, an inline stage unwinds (releasing its lock), no `except Exception` eats it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_interrupt():
    """While the block runs, SIGTERM and SIGHUP raise `DriverInterrupted` (Python's default for them is to die
    on the spot, skipping every cleanup: the local jobs trained on unsupervised and locks stayed behind). A
    second signal during the cleanup is ignored, so it cannot cut the cleanup short. A no-op off the main
    thread (only it may set signal handlers); the previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise DriverInterrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@EXECUTORS.register("debug")
def _execute_debug(plan: StudyPlan, sdir: Path, *, profile: dict, wait: bool, max_parallel: int | None,
                   timeout_s: float | None, poll_s: float, verbose: bool = False) -> ExecutionSummary:
    """In this process, in wave order; a failure is recorded (error.json) and blocks only its dependents."""
    tally = _Tally(sdir)
    total = len(plan.stages)
    for wave in waves(plan):
        for stage in wave:
            n = len(tally.done) + len(tally.skipped) + len(tally.failed) + len(tally.blocked) + 1
            if _already_done(tally, sdir, stage):
                tally.skipped.append(stage.id)
            elif tally.bad(stage):
                tally.blocked.append(stage.id)
            else:
                start = time.time()
                if verbose:
                    print(f"[{n}/{total}] {stage.id} ...", file=sys.stderr, flush=True)
                try:
                    run_stage(sdir, stage.id)
                    tally.done.append(stage.id)
                    if verbose:
                        print(f"[{n}/{total}] {stage.id} done in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
                except Exception as e:  # noqa: BLE001 - reported in the summary and error.json
                    tally.failed[stage.id] = f"{type(e).__name__}: {e}"
                    if verbose:
                        print(f"[{n}/{total}] {stage.id} FAILED: {tally.failed[stage.id]}", file=sys.stderr, flush=True)
    return tally.summary()


# In this process with progress lines and bars on the terminal: what `make demo` uses on one machine.
EXECUTORS.register("inline", functools.partial(_execute_debug, verbose=True))


def _visible_gpus() -> tuple[int, str | None]:
    """(how many GPUs this process may use, its CUDA_VISIBLE_DEVICES or None)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip()]), cvd
    if shutil.which("nvidia-smi") is None:
        return 0, None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return len([ln for ln in out.splitlines() if ln.startswith("GPU ")]), None
    return 0, None


def _job_for(sdir: Path, stage: Stage) -> StageJob:
    cls = CheckpointableStageJob if STAGE_KINDS.get(stage.kind).checkpointable else StageJob
    return cls(str(sdir), stage.id)


def _say(line: str) -> None:
    """A progress line of an executor (stderr, flushed: it shows in logs and on the terminal as it happens)."""
    print(line, file=sys.stderr, flush=True)


def _say_end(tally: _Tally, stage_id: str, wall_s: float | None) -> None:
    if stage_id in tally.failed:
        _say(f"  {stage_id} FAILED: {tally.failed[stage_id]}")
    elif stage_id in tally.done:
        _say(f"  {stage_id} done" + (f" in {wall_s:.1f} s" if wall_s is not None else ""))


@EXECUTORS.register("local")
def _execute_local(plan: StudyPlan, sdir: Path, *, profile: dict, wait: bool, max_parallel: int | None,
                   timeout_s: float | None, poll_s: float) -> ExecutionSummary:
    """One local process per stage, one wave at a time, at most `max_parallel` (default 1) at once.

    Every job sees the GPUs this process sees (LocalExecutor would otherwise set CUDA_VISIBLE_DEVICES=""
    unless gpus_per_node > 0, and renumber a restricted CUDA_VISIBLE_DEVICES from 0)."""
    if not wait:
        raise ValueError("executor='local' cannot return before the study is done (wait=False): local jobs have "
                         "no dependencies between waves; use executor='slurm'")
    cap = max(1, int(max_parallel or 1))
    n_gpus, cvd = _visible_gpus()
    setup = _source_setup(plan) + ([f"export CUDA_VISIBLE_DEVICES={shlex.quote(cvd)}"] if cvd is not None else [])
    deadline = None if timeout_s is None else time.time() + timeout_s
    tally = _Tally(sdir)
    total = len(plan.stages)
    started: dict[str, float] = {}
    for wave in waves(plan):
        queue: list[Stage] = []
        for stage in wave:
            if _already_done(tally, sdir, stage):
                tally.skipped.append(stage.id)
            elif tally.bad(stage):
                tally.blocked.append(stage.id)
            else:
                queue.append(stage)
        running: dict[str, tuple[Stage, Any]] = {}
        waiting: list[Stage] = []  # locked by a live process of another run: not submitted while it holds them
        try:
            while queue or running or waiting:
                for stage in list(waiting):
                    if not lock_holder(stage_dir(sdir, stage.id))[1]:
                        waiting.remove(stage)
                        if is_done(stage_dir(sdir, stage.id)):
                            tally.done.append(stage.id)  # finished by the other run
                        else:
                            queue.insert(0, stage)  # its holder is gone without a record: run it ourselves
                while queue and len(running) < cap:
                    stage = queue.pop(0)
                    holder, live = lock_holder(stage_dir(sdir, stage.id))
                    if live:
                        who = holder.describe() if holder else "a process that is taking the lock"
                        print(f"stage {stage.id} is locked by {who}: waiting for it to finish", file=sys.stderr,
                              flush=True)
                        waiting.append(stage)
                        continue
                    cls = STAGE_KINDS.get(stage.kind).resources
                    res = {**profile["defaults"], **profile["resources"].get(cls, {}), **profile["overrides"]}
                    ex = submitit.AutoExecutor(folder=sdir / JOBS / "%j", cluster="local")  # never auto-detect
                    ex.update_parameters(timeout_min=int(res.get("timeout_min", LOCAL_TIMEOUT_MIN)),
                                         gpus_per_node=n_gpus, local_setup=setup, name=stage.kind)
                    with contextlib.suppress(FileNotFoundError):  # an old failure is not this attempt's
                        os.unlink(stage_dir(sdir, stage.id) / ERROR)
                    job = ex.submit(_job_for(sdir, stage))
                    tally.submitted[stage.id] = str(job.job_id)
                    running[stage.id] = (stage, job)
                    started[stage.id] = time.time()
                    # status names the log while the stage runs (run_stage removes this file when it is done)
                    atomic_write_json(stage_dir(sdir, stage.id) / SUBMITTED, {
                        "executor": "local", "job_id": str(job.job_id), "time": now_iso(), "time_unix": time.time(),
                        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
                    _say(f"[{len(started)}/{total}] {stage.id} started (local job {job.job_id}; log {job.paths.stderr})")
                for sid, (stage, job) in list(running.items()):
                    if job.done():
                        del running[sid]
                        _settle(tally, sdir, stage, lambda job=job: _local_failure(job))
                        _say_end(tally, stage.id, time.time() - started[stage.id])
                if deadline is not None and time.time() > deadline and (running or waiting):
                    tally.pending.extend(running)
                    tally.pending.extend(s.id for s in waiting + queue)
                    return tally.summary()
                if running or waiting:
                    time.sleep(min(poll_s, 0.2))
        except BaseException as e:
            # Ctrl-C, SIGTERM, SIGHUP (`signals_interrupt`) or any error in the driver: local jobs would otherwise
            # outlive it, training on unsupervised. Ctrl-C at a terminal has already reached the jobs too.
            _cancel_local_jobs(sdir, running, signalled=type(e) is KeyboardInterrupt)
            raise
    return tally.summary()


LOCAL_CANCEL_GRACE_S = 20.0  # how long a cancelled job process may take to unwind (release its lock) before SIGKILL


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc; [root] where /proc cannot tell)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _is_task(pid: int) -> bool:
    """Whether `pid` is a submitit task process (the one running `run_stage`), not its controller or shell."""
    try:
        return b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _cancel_local_jobs(sdir: Path, running: dict[str, tuple[Stage, Any]], signalled: bool = False) -> None:
    """Stop the local jobs of `running` and everything they started; no job process or lock outlives this.

    SIGINT goes to the task processes only (a KeyboardInterrupt unwinds `run_stage`, releasing the lock and
    removing running.json): submitit's LocalJob.cancel signals the job's shell, which passes nothing on, and
    the controller would forward a second SIGINT that could cut the unwinding short. Whatever still lives after
    LOCAL_CANCEL_GRACE_S is SIGKILLed; then the locks of the killed holders are broken. `signalled`: the tasks
    may have had a SIGINT already (Ctrl-C signals the terminal's whole process group), so they get a moment to
    unwind before another one, which could interrupt their cleanup."""
    trees = {}
    for sid, (_, job) in running.items():
        proc = getattr(job, "_process", None)
        root = proc.pid if proc is not None else int(job.job_id)
        trees[sid] = (proc, [(pid, _pid_start(pid)) for pid in _process_tree(root)])
    everyone = [p for _, tree in trees.values() for p in tree]
    tasks = [(pid, start) for pid, start in everyone if _is_task(pid)] or everyone
    if signalled:
        deadline = time.time() + 2.0
        while time.time() < deadline and any(_alive(pid, start, trees) for pid, start in tasks):
            time.sleep(0.05)
    for pid, start in tasks:
        if _alive(pid, start, trees):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
    deadline = time.time() + LOCAL_CANCEL_GRACE_S
    while time.time() < deadline and any(_alive(pid, start, trees) for pid, start in everyone):
        time.sleep(0.05)
    for pid, start in everyone:
        if _alive(pid, start, trees):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for sid, (proc, _) in trees.items():
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)  # reap our direct child
        with contextlib.suppress(OSError):
            break_stale_lock(stage_dir(sdir, sid))


def _alive(pid: int, start: int | None, trees: dict) -> bool:
    for proc, _ in trees.values():
        if proc is not None and proc.pid == pid:
            proc.poll()  # reaps our direct child once it exited (a zombie would look alive to os.kill)
    return pid_alive(pid, start)


def _local_failure(job: Any) -> str:
    """The job's own exception ("Type: message"), not the last line of submitit's FailedJobError text."""
    with contextlib.suppress(Exception):
        exc = job.exception()
        if exc is not None:
            return job_exception(str(exc)) or f"{type(exc).__name__}: {str(exc).strip()[:500]}"
    return f"local job {job.job_id} ended without a record (see {job.paths.stderr})"


def job_exception(text: str) -> str | None:
    """The last exception of a Python traceback in `text` (submitit's FailedJobError text, a job's log) as
    "Type: message", the type without its module path; None when `text` holds no traceback.

    A traceback ends with its exception: the unindented line(s) after the last frame of the last
    "Traceback (most recent call last):" (a chained exception prints the cause first)."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    exc: list[str] = []
    for ln in lines[starts[-1] + 1:]:
        if not ln.strip() or ln.startswith((" ", "\t")) or ln.startswith("-----"):
            if exc:
                break
            continue
        exc.append(ln.strip())
    if not exc:
        return None
    kind, sep, message = " ".join(exc).partition(":")
    kind = kind.rsplit(".", 1)[-1] if " " not in kind else kind
    return f"{kind}{sep}{message}"[:2000]


def _settle(tally: _Tally, sdir: Path, stage: Stage, why: Callable[[], str]) -> None:
    """File a finished job's stage under done or failed, from the stage's own files."""
    out = stage_dir(sdir, stage.id)
    if is_done(out):
        tally.done.append(stage.id)
    else:
        tally.failed[stage.id] = _error_summary(out) or why()


# ------------------------------------------------------------------------------------------------ SLURM
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD"}
UNKNOWN_GRACE_S = 120.0  # sacct/squeue may not know a job for a moment after sbatch returns
RECORD_GRACE_S = 30.0  # a job that COMPLETED may show its record a little later on a network filesystem


@EXECUTORS.register("slurm")
def _execute_slurm(plan: StudyPlan, sdir: Path, *, profile: dict, wait: bool, max_parallel: int | None,
                   timeout_s: float | None, poll_s: float) -> ExecutionSummary:
    """Submit one job array per (wave, resource class, input jobs), chained by afterok; then maybe wait."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("executor='slurm' needs sbatch on PATH (and SLURM_CONF for a non-default cluster)")
    tally = _Tally(sdir)
    for k, wave in enumerate(waves(plan)):
        # one array per (resource class, dependency set): an array's --dependency holds for all its tasks, so
        # stages with different inputs in one array would all be cancelled when any one input fails
        groups: dict[tuple[str, tuple[str, ...]], list[Stage]] = {}
        for stage in wave:
            if _already_done(tally, sdir, stage):
                tally.skipped.append(stage.id)
            elif tally.bad(stage) or any(d not in tally.submitted and not is_done(stage_dir(sdir, d))
                                         for d in stage.inputs.values()):
                tally.blocked.append(stage.id)
            else:
                deps = tuple(sorted({tally.submitted[d] for d in stage.inputs.values() if d in tally.submitted}))
                groups.setdefault((STAGE_KINDS.get(stage.kind).resources, deps), []).append(stage)
        for (cls, deps), stages in groups.items():
            res = resources_for(profile, cls)
            params = _slurm_parameters(res)
            params["setup"] = _source_setup(plan) + list(params.get("setup", []))
            params["job_name"] = f"fsdfm-{plan.name}-w{k}-{cls}"
            if max_parallel:
                params["array_parallelism"] = int(max_parallel)
            extra = dict(params.pop("additional_parameters", {}) or {})
            if deps:
                # afterok on the very array tasks this group reads; kill-on-invalid-dep so that the dependents
                # of a failed stage are cancelled instead of pending forever
                extra.update({"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"})
            if extra:
                params["additional_parameters"] = extra
            ex = submitit.SlurmExecutor(folder=sdir / JOBS / "%j", max_num_timeout=int(res.get("max_num_timeout", 3)))
            ex.update_parameters(**params)
            for s in stages:  # a failure report from an earlier submission must not be read as this one's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stage_dir(sdir, s.id) / ERROR)
            try:
                with ex.batch():
                    jobs = [ex.submit(_job_for(sdir, s)) for s in stages]
            except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError,
                    subprocess.CalledProcessError) as e:
                # e.g. sbatch refuses afterok on an input job that already failed ("Job dependency problem")
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                for s in stages:
                    tally.failed[s.id] = f"sbatch failed: {msg}"
                continue
            for s, job in zip(stages, jobs):
                tally.submitted[s.id] = str(job.job_id)
                _say(f"wave {k}: {s.id} submitted as slurm job {job.job_id} (log {job.paths.stderr})")
                atomic_write_json(stage_dir(sdir, s.id) / SUBMITTED, {
                    "executor": "slurm", "job_id": str(job.job_id), "time": now_iso(), "time_unix": time.time(),
                    "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
    if not wait:
        tally.pending.extend(tally.submitted)
        return tally.summary()
    waited = wait_for(sdir, list(tally.submitted), timeout_s=timeout_s, poll_s=poll_s)
    return ExecutionSummary(str(sdir), waited.done, tuple(tally.skipped), waited.failed, waited.blocked,
                            waited.pending, dict(tally.submitted))


def _expand_job_ids(jid: str) -> list[str]:
    """'12', '12_3' -> itself; '12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']."""
    if "_[" not in jid:
        return [jid]
    main, rest = jid.split("_[", 1)
    out = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        a, _, b = part.partition("-")
        out += [f"{main}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """The SLURM state of each job id (array tasks as "A_i"): sacct first (knows finished jobs), then squeue
    for what sacct does not know (no accounting, or not recorded yet). Unknown ids map to "UNKNOWN"."""
    states: dict[str, str] = {}
    mains = sorted({j.split("_")[0] for j in job_ids})
    commands = [["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(mains)],
                ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(mains)]]
    for cmd in commands:
        if all(j in states for j in job_ids):
            break
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            jid, _, state = line.strip().partition("|")
            if not jid or "." in jid or not state:
                continue
            for j in _expand_job_ids(jid):
                states.setdefault(j, state.split()[0].rstrip("+").upper())  # "CANCELLED by 0" -> CANCELLED
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def wait_for(study_dir: str | os.PathLike, stage_ids: list[str] | None = None, timeout_s: float | None = None,
             poll_s: float = 2.0) -> ExecutionSummary:
    """Wait until the given stages (default: every stage not done) are done or have failed.

    The stage files decide (record.json = done, error.json = failed); the cluster's job state (from the job id
    in submitted.json) only tells whether to keep waiting: a job that ended without a record is a failure,
    never an endless wait. A stage with neither a job nor a live lock counts as failed ("not submitted").
    Stages still unfinished after `timeout_s` are returned as pending."""
    sdir = Path(study_dir)
    plan = read_plan(sdir)
    todo = list(stage_ids) if stage_ids is not None else [s for s in plan["stages"]
                                                          if not is_done(stage_dir(sdir, s))]
    inputs = {sid: list(plan["stages"][sid].get("inputs", {}).values()) for sid in plan["stages"]}
    deadline = None if timeout_s is None else time.time() + timeout_s
    tally = _Tally(sdir)
    first_unknown: dict[str, float] = {}
    ended_at: dict[str, float] = {}
    seen_running: set[str] = set()
    while todo:
        jobs = {}
        for sid in todo:
            with contextlib.suppress(OSError, ValueError, KeyError):
                jobs[sid] = read_json(stage_dir(sdir, sid) / SUBMITTED)["job_id"]
        states = slurm_states(list(jobs.values())) if jobs else {}
        for sid in list(todo):
            out = stage_dir(sdir, sid)
            if is_done(out):
                tally.done.append(sid)
                todo.remove(sid)
                wall = (read_record(out, warn=False) or {}).get("provenance", {}).get("wall_s")
                _say_end(tally, sid, wall if isinstance(wall, (int, float)) else None)
                continue
            jid = jobs.get(sid)
            state = states.get(jid, "UNKNOWN") if jid else None
            _, live = lock_holder(out)
            if (live or state == "RUNNING") and sid not in seen_running:
                seen_running.add(sid)
                _say(f"  {sid} started" + (f" (slurm job {jid})" if jid else ""))
            if live or state in SLURM_ACTIVE:
                continue
            now = time.time()
            if state == "UNKNOWN" and now - first_unknown.setdefault(sid, now) < UNKNOWN_GRACE_S:
                continue  # sacct/squeue may not list a job yet
            if state == "COMPLETED" and not (out / ERROR).exists() \
                    and now - ended_at.setdefault(sid, now) < RECORD_GRACE_S:
                continue  # the record may show up late on a network filesystem
            todo.remove(sid)
            err = _error_summary(out)
            if err:
                tally.failed[sid] = err
                _say_end(tally, sid, None)
            elif any(d in tally.failed or d in tally.blocked for d in inputs.get(sid, [])):
                tally.blocked.append(sid)
            elif jid is None:
                tally.failed[sid] = "not submitted (no submitted.json) and not running"
            else:
                tally.failed[sid] = _slurm_failure(out, jid, state, sdir)
        if not todo:
            break
        if deadline is not None and time.time() > deadline:
            tally.pending.extend(todo)
            break
        time.sleep(poll_s)
    # a stage that failed because its input failed is blocked, whatever order we noticed them in
    for sid in list(tally.failed):
        if any(d in tally.failed for d in inputs.get(sid, [])) and not (stage_dir(sdir, sid) / ERROR).exists():
            del tally.failed[sid]
            tally.blocked.append(sid)
    return tally.summary()


def _slurm_failure(out: Path, jid: str, state: str, sdir: Path) -> str:
    """Why a SLURM job ended without a record: its own exception from its stderr log where it printed one
    (e.g. an input that is not done), else the job state and where the logs are."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        log = Path(read_json(out / SUBMITTED)["stderr"])
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 256 * 1024))  # the end of the log holds the final traceback
            exc = job_exception(f.read().decode("utf-8", "replace"))
        if exc:
            return f"{exc} (slurm job {jid}, {state}; log {log})"
    return f"slurm job {jid} ended ({state}) without a record; see its logs in {sdir / JOBS}"


# ----------------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class StageStatus:
    stage_id: str
    kind: str
    state: str  # "done" | "running" | "failed" | "blocked" | "pending"
    detail: str = ""
    error_tail: tuple = ()
    wall_s: float | None = None


@dataclass(frozen=True)
class StatusReport:
    study: str
    study_dir: str
    stages: tuple  # of StageStatus, in wave order
    runs_total: int = 0
    runs_done: int = 0

    STATES = ("done", "running", "failed", "blocked", "pending")

    def by_state(self, state: str) -> list[StageStatus]:
        return [s for s in self.stages if s.state == state]

    def counts(self) -> dict[str, int]:
        return {st: len(self.by_state(st)) for st in self.STATES}

    def format(self, error_lines: int = 8) -> str:
        c = self.counts()
        lines = [f"study {self.study} ({self.study_dir}): " + ", ".join(f"{c[s]} {s}" for s in self.STATES)
                 + f"; runs {self.runs_done}/{self.runs_total} done"]
        for s in self.stages:
            lines.append(f"  {s.state:<8} {s.stage_id:<32} {s.detail}".rstrip())
            for ln in s.error_tail[-error_lines:]:
                lines.append(f"           | {ln}")
        return "\n".join(lines)


def _scheduler_states(sdir: Path, stage_ids: list[str]) -> tuple[dict[str, dict], dict[str, str] | None]:
    """(submitted.json of each of `stage_ids` that has a SLURM one, the scheduler's state of those jobs);
    the states are None when neither sacct nor squeue is on PATH (then nobody here can tell)."""
    subs = {}
    for sid in stage_ids:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            sub = read_json(stage_dir(sdir, sid) / SUBMITTED)
            if sub.get("executor") == "slurm" and sub.get("job_id"):
                subs[sid] = sub
    if not subs:
        return subs, {}
    if shutil.which("sacct") is None and shutil.which("squeue") is None:
        return subs, None
    return subs, slurm_states(sorted({str(sub["job_id"]) for sub in subs.values()}))


def _log_note(d: Path) -> str:
    """"; log <stderr file>" of the job a stage was handed to (submitted.json), or ""."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        log = read_json(d / SUBMITTED).get("stderr")
        if log:
            return f"; log {log}"
    return ""


def status(study_dir: str | os.PathLike, scheduler: bool = True, plan: StudyPlan | None = None) -> StatusReport:
    """Per stage: done (with wall time), running (host, pid, job, since), failed (type, message and the last
    lines of the traceback; or a SLURM job that was cancelled, failed or vanished without a record, with its
    state), blocked (an input failed or is blocked: it cannot run) or pending (not run yet; queued as a job;
    an interrupted attempt whose process is gone).

    Reads the study's files and, with `scheduler` (default) and stages submitted to SLURM, asks the scheduler
    (`slurm_states`: sacct, then squeue) about their job ids once: a job that is no longer queued or running
    and left no record is failed, never "pending" (a job the scheduler does not know yet, in the first
    UNKNOWN_GRACE_S after sbatch, is pending).

    `plan`: the plan to report on instead of plan.json (a study that has not run yet: every stage pending).
    A stage handed to a job names the job's log (stderr) file."""
    sdir = Path(study_dir)
    if plan is None:
        plan = StudyPlan.from_dict(read_plan(sdir), str(sdir / PLAN))
    todo = [sid for sid in plan.stages if not is_done(stage_dir(sdir, sid)) and not lock_holder(stage_dir(sdir, sid))[1]]
    subs, states = _scheduler_states(sdir, todo) if scheduler else ({}, None)
    out = []
    blocked_by: dict[str, str] = {}  # stage id -> the failed stage upstream of it (or itself, if it failed)
    for wave in waves(plan):
        for stage in wave:
            d = stage_dir(sdir, stage.id)
            rec = read_record(d)
            check = check_stage(d)  # a damaged or stale stage is not done: the next run redoes it
            if check.done:
                wall = rec.get("provenance", {}).get("wall_s")
                out.append(StageStatus(stage.id, stage.kind, "done",
                                       f"{wall:.1f} s" if isinstance(wall, (int, float)) else "", wall_s=wall))
                continue
            holder, live = lock_holder(d)
            if live:
                who = holder.describe() if holder else "starting"
                out.append(StageStatus(stage.id, stage.kind, "running", who + _log_note(d)))
                continue
            if (d / ERROR).exists():
                with contextlib.suppress(OSError, ValueError):
                    err = read_json(d / ERROR)
                    out.append(StageStatus(stage.id, stage.kind, "failed", f"{err.get('type')}: {err.get('message')}"
                                           f" (attempt {err.get('attempt')}, {err.get('time')})" + _log_note(d),
                                           error_tail=tuple(err.get("traceback_tail", ()))))
                    blocked_by[stage.id] = stage.id
                    continue
            notes = [f"{check.state}: {check.problems[0]}"] if check.problems else []
            sub = subs.get(stage.id)
            state = None
            if sub is not None:
                jid = str(sub["job_id"])
                state = states.get(jid, "UNKNOWN") if states is not None else None
                known = "" if states is not None else "; no sacct/squeue here to ask"
                notes.append(f"submitted as slurm job {jid} at {sub.get('time')}{known}"
                             + (f" ({state})" if state else ""))
            else:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    other = read_json(d / SUBMITTED)
                    notes.append(f"submitted as {other['executor']} job {other['job_id']} at {other['time']}")
            if _log_note(d):
                notes.append(_log_note(d)[2:])
            if holder is not None:
                notes.append(f"interrupted: {holder.describe()} is gone")
            bad = [dep for dep in stage.inputs.values() if dep in blocked_by]
            if bad:
                blocked_by[stage.id] = blocked_by[bad[0]]
                out.append(StageStatus(stage.id, stage.kind, "blocked",
                                       "; ".join([f"input {blocked_by[bad[0]]} failed"] + notes)))
                continue
            if state is not None and state not in SLURM_ACTIVE:
                young = time.time() - float(sub.get("time_unix") or 0) < UNKNOWN_GRACE_S
                if not (state == "UNKNOWN" and young):  # else sacct/squeue may not list a fresh job yet
                    what = ("vanished: the scheduler knows no job " + str(sub["job_id"]) if state == "UNKNOWN"
                            else f"slurm job {sub['job_id']} ended {state} without a record")
                    why = _slurm_failure(d, str(sub["job_id"]), state, sdir)
                    detail = what if why.startswith("slurm job") else f"{what}: {why}"
                    out.append(StageStatus(stage.id, stage.kind, "failed", detail))
                    blocked_by[stage.id] = stage.id
                    continue
            if state == "RUNNING":  # the job started; run_stage has not taken the lock yet
                out.append(StageStatus(stage.id, stage.kind, "running", "; ".join(notes + ["starting"])))
                continue
            out.append(StageStatus(stage.id, stage.kind, "pending", "; ".join(notes)))
    done = {s.stage_id for s in out if s.state == "done"}
    return StatusReport(plan.name, str(sdir), tuple(out), runs_total=len(plan.runs),
                        runs_done=sum(r.stage_id in done for r in plan.runs))
