"""The local executor: one submitit LocalExecutor job (a process) per stage, each started once its inputs are
done, at most `max_parallel` at once (LocalExecutor has no parallelism cap of its own), and the cancelling of those jobs when
the driver is interrupted.

`cluster="local"` is always explicit: submitit's auto-detection picks SLURM as soon as `srun` is on PATH.
`timeout_min` is always set (an int; the local default is 2 minutes). Knows local processes (psutil); the stage
work is `run_stage`, run by the job.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import submitit

from fsdfm.launch.executors import EXECUTORS
from fsdfm.launch.outcomes import (
    ExecutionSummary,
    Tally,
    clear_error,
    job_exception,
    runnable,
    say,
    say_end,
    settle,
    write_submitted,
)
from fsdfm.launch.profiles import LOCAL_TIMEOUT_MIN, source_setup
from fsdfm.launch.runner import job_for
from fsdfm.records import JOBS, break_stale_lock, is_done, lock_holder, pid_alive, stage_dir
from fsdfm.records.locks import _pid_start
from fsdfm.study.graph import STAGE_KINDS, Stage, StudyPlan, waves


def nvidia_smi_gpus() -> int:
    """How many GPUs `nvidia-smi -L` lists (0 without nvidia-smi or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return len([ln for ln in out.splitlines() if ln.startswith("GPU ")])
    return 0


def _visible_gpus() -> tuple[int, str | None]:
    """(how many GPUs this process may use, its CUDA_VISIBLE_DEVICES or None)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip()]), cvd
    return nvidia_smi_gpus(), None


@EXECUTORS.register("local")
def _execute_local(
    plan: StudyPlan,
    sdir: Path,
    *,
    profile: dict,
    wait: bool,
    max_parallel: int | None,
    timeout_s: float | None,
    poll_s: float,
) -> ExecutionSummary:
    """One local process per stage, at most `max_parallel` (default 1) at once (`run_slots`). Every job sees the
    GPUs this process sees (LocalExecutor would otherwise set CUDA_VISIBLE_DEVICES="" unless gpus_per_node > 0,
    and renumber a restricted CUDA_VISIBLE_DEVICES from 0)."""
    if not wait:
        raise ValueError(
            "executor='local' cannot return before the study is done (wait=False): local jobs have "
            "no dependencies between them; use executor='slurm'"
        )
    slots = [None] * max(1, int(max_parallel or 1))
    return run_slots(plan, sdir, profile, slots, "local", timeout_s=timeout_s, poll_s=poll_s)


def run_slots(
    plan: StudyPlan,
    sdir: Path,
    profile: dict,
    slots: list[str | None],
    executor: str,
    *,
    timeout_s: float | None,
    poll_s: float,
) -> ExecutionSummary:
    """Run the plan's stages as local jobs, one per slot at a time, each started as soon as its inputs are done (a
    ready queue in plan order, not wave by wave: one long stage does not hold the other slots idle until its whole
    wave ends). A slot is a device (the job sees only that GPU: `CUDA_VISIBLE_DEVICES=<device>`, executor
    "local_gpus") or None (the job sees what this process sees, executor "local")."""
    n_gpus, cvd = _visible_gpus()
    setup = source_setup(plan)
    deadline = None if timeout_s is None else time.time() + timeout_s
    tally = Tally(sdir)
    total = len(plan.stages)
    started: dict[str, float] = {}
    todo = [stage for wave in waves(plan) for stage in wave]  # topological order: reproducible submissions
    settled: set[str] = set()
    queue: list[Stage] = []
    running: dict[str, tuple[Stage, Any, int]] = {}  # id -> (stage, job, slot index)
    free = list(range(len(slots)))  # slot indices not running a job
    waiting: list[Stage] = []  # locked by a live process of another run: not submitted while it holds them
    try:
        _promote(tally, sdir, todo, queue, settled)
        while todo or queue or running or waiting:
            if _release_waiting(tally, sdir, waiting, queue, settled):
                _promote(tally, sdir, todo, queue, settled)  # done by the other run: its dependents are ready
            while queue and free:
                stage = queue.pop(0)
                if _locked_elsewhere(sdir, stage):
                    waiting.append(stage)
                    continue
                slot = free.pop(0)
                device = slots[slot]
                gpus, export = _job_devices(device, n_gpus, cvd)
                job = _submit_local(sdir, stage, profile, gpus, setup + export)
                tally.submitted[stage.id] = str(job.job_id)
                running[stage.id] = (stage, job, slot)
                started[stage.id] = time.time()
                write_submitted(sdir, stage.id, executor, job, **({"device": device} if device else {}))
                on = f" on device {device}" if device else ""
                say(f"[{len(started)}/{total}] {stage.id} started{on} (local job {job.job_id}; log {job.paths.stderr})")
            for sid, (stage, job, slot) in list(running.items()):
                if job.done():
                    del running[sid]
                    free = sorted([*free, slot])
                    settle(tally, sdir, stage, lambda job=job: _local_failure(job))
                    settled.add(sid)
                    say_end(tally, stage.id, time.time() - started[stage.id])
                    _promote(tally, sdir, todo, queue, settled)
            if deadline is not None and time.time() > deadline and (running or waiting or queue or todo):
                tally.pending.extend(running)
                tally.pending.extend(s.id for s in waiting + queue + todo)
                return tally.summary()
            if running or waiting:
                time.sleep(min(poll_s, 0.2))
            elif todo and not queue:  # nothing runs and nothing can: a bug in the plan's order, never a hang
                raise RuntimeError(f"local executor: {len(todo)} stage(s) wait on inputs that never settle")
    except BaseException as e:
        # Ctrl-C, SIGTERM, SIGHUP (`signals_interrupt`) or any error in the driver: local jobs would otherwise
        # outlive it, training on unsupervised. Ctrl-C at a terminal has already reached the jobs too.
        jobs = {sid: (stage, job) for sid, (stage, job, _) in running.items()}
        _cancel_local_jobs(sdir, jobs, signalled=type(e) is KeyboardInterrupt)
        raise
    return tally.summary()


def _job_devices(device: str | None, n_gpus: int, cvd: str | None) -> tuple[int, list[str]]:
    """(gpus_per_node, setup lines) of a job on `device`. gpus_per_node > 0 keeps submitit from blanking
    CUDA_VISIBLE_DEVICES; the export (run after submitit's own environment) then names the job's devices,
    whatever submitit renumbered."""
    if device is not None:
        return 1, [f"export CUDA_VISIBLE_DEVICES={shlex.quote(device)}"]
    return n_gpus, ([f"export CUDA_VISIBLE_DEVICES={shlex.quote(cvd)}"] if cvd is not None else [])


def _promote(tally: Tally, sdir: Path, todo: list[Stage], queue: list[Stage], settled: set[str]) -> None:
    """Move the stages of `todo` whose inputs have all settled to the end of `queue`, in plan order. A stage
    that is done already is filed as skipped, one behind a failed input as blocked; both settle at once, which
    may free stages after them, hence the repeat."""
    moved = True
    while moved:
        moved = False
        for stage in [s for s in todo if all(d in settled for d in s.inputs.values())]:
            todo.remove(stage)
            moved = True
            if runnable(tally, sdir, [stage]):
                queue.append(stage)
            else:
                settled.add(stage.id)


def _release_waiting(tally: Tally, sdir: Path, waiting: list[Stage], queue: list[Stage], settled: set[str]) -> bool:
    """Stages whose lock holder (another run) let go: done by it, or queued first (it is gone without a record).
    Returns whether any of them settled (was done by the other run)."""
    n_settled = len(settled)
    for stage in list(waiting):
        if not lock_holder(stage_dir(sdir, stage.id))[1]:
            waiting.remove(stage)
            if is_done(stage_dir(sdir, stage.id)):
                tally.done.append(stage.id)
                settled.add(stage.id)
            else:
                queue.insert(0, stage)
    return len(settled) > n_settled


def _locked_elsewhere(sdir: Path, stage: Stage) -> bool:
    """Whether a live process of another run holds the stage's lock (said on stderr: this run waits for it)."""
    holder, live = lock_holder(stage_dir(sdir, stage.id))
    if live:
        who = holder.describe() if holder else "a process that is taking the lock"
        say(f"stage {stage.id} is locked by {who}: waiting for it to finish")
    return live


def _submit_local(sdir: Path, stage: Stage, profile: dict, n_gpus: int, setup: list[str]) -> Any:
    """One submitit LocalExecutor job running `stage`, with the timeout of its resource class."""
    cls = STAGE_KINDS.get(stage.kind).resources
    res = {**profile["defaults"], **profile["resources"].get(cls, {}), **profile["overrides"]}
    ex = submitit.AutoExecutor(folder=sdir / JOBS / "%j", cluster="local")  # never auto-detect
    ex.update_parameters(
        timeout_min=int(res.get("timeout_min", LOCAL_TIMEOUT_MIN)),
        gpus_per_node=n_gpus,
        local_setup=setup,
        name=stage.kind,
    )
    clear_error(sdir, stage.id)
    return ex.submit(job_for(sdir, stage))


LOCAL_CANCEL_GRACE_S = 20.0  # how long a cancelled job process may take to unwind (release its lock) before SIGKILL


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (psutil: Linux and macOS alike; [root] when it is gone or cannot be asked)."""
    try:
        return [root] + [p.pid for p in psutil.Process(root).children(recursive=True)]
    except (psutil.Error, OSError):
        return [root]


def _is_task(pid: int) -> bool:
    """Whether `pid` is a submitit task process (the one running `run_stage`), not its controller or shell."""
    try:
        return any("submitit.core._submit" in part for part in psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
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
    _wait_then_signal(tasks, 2.0 if signalled else 0.0, signal.SIGINT, trees)  # unwind: release the lock
    _wait_then_signal(everyone, LOCAL_CANCEL_GRACE_S, signal.SIGKILL, trees)  # whatever did not unwind in time
    for sid, (proc, _) in trees.items():
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)  # reap our direct child
        with contextlib.suppress(OSError):
            break_stale_lock(stage_dir(sdir, sid))


def _wait_then_signal(pids: list[tuple[int, int | None]], grace_s: float, sig: int, trees: dict) -> None:
    """Wait up to `grace_s` for the processes `pids` ((pid, start time)) to exit, then send `sig` to those that
    still live (the start time sees through pid reuse: a recycled pid is never signalled)."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(pid, start, trees) for pid, start in pids):
        time.sleep(0.05)
    for pid, start in pids:
        if _alive(pid, start, trees):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


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
