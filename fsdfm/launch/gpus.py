"""The "local_gpus" executor: one machine with several GPUs and no SLURM. Each GPU runs one stage at a time, in its
own submitit local process that sees only that GPU (`CUDA_VISIBLE_DEVICES=<device>`), and the stages of a study
run as soon as their inputs are done (no wave barrier: a sample stage of one teacher starts while another teacher
still trains). The record's provenance keeps the device (`cuda_visible_devices`).

Devices, first found wins:
* `FSDFM_DEVICES` ("0,1,2,3"; a device named twice gets two slots, "0,0,1,1" runs two stages per GPU);
* this process's `CUDA_VISIBLE_DEVICES` (each entry one slot);
* `nvidia-smi -L` (GPUs 0..n-1).
`max_parallel` caps the slots in use at once. Without a device the executor refuses to start (use "local").

Reuses the local executor's job cancelling (`fsdfm.launch.local`): Ctrl-C, SIGTERM or an error in the driver stops
every job and releases its lock.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from fsdfm.io import atomic_write_json
from fsdfm.launch.executors import EXECUTORS
from fsdfm.launch.local import _cancel_local_jobs, _local_failure
from fsdfm.launch.outcomes import ExecutionSummary, Tally, already_done, say, say_end, settle
from fsdfm.launch.profiles import LOCAL_TIMEOUT_MIN, source_setup
from fsdfm.launch.runner import job_for
from fsdfm.records import ERROR, JOBS, SUBMITTED, lock_holder, now_iso, stage_dir
from fsdfm.study.graph import STAGE_KINDS, Stage, StudyPlan, waves

DEVICES_ENV = "FSDFM_DEVICES"


class NoDevicesError(ValueError):
    """The local_gpus executor found no device to run on."""


def device_slots(environ: dict | None = None) -> list[str]:
    """The device of each slot (a `CUDA_VISIBLE_DEVICES` value per concurrent job), see the module docstring.

    Returns e.g. ["0", "1"]; raises NoDevicesError when none is found or FSDFM_DEVICES is malformed."""
    env = os.environ if environ is None else environ
    for var in (DEVICES_ENV, "CUDA_VISIBLE_DEVICES"):
        raw = env.get(var)
        if raw is None:
            continue
        slots = [d.strip() for d in raw.split(",")]
        if not raw.strip() or any(not d or any(c.isspace() for c in d) for d in slots):
            raise NoDevicesError(
                f"{var}={raw!r}: expected a comma-separated list of GPU indices or UUIDs (e.g. 0,1,2,3)"
            )
        return slots
    if shutil.which("nvidia-smi") is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            n = len([ln for ln in out.splitlines() if ln.startswith("GPU ")])
            if n:
                return [str(i) for i in range(n)]
    raise NoDevicesError(
        f"executor 'local_gpus' found no GPU (no {DEVICES_ENV}, no CUDA_VISIBLE_DEVICES, nvidia-smi lists none); "
        f"set {DEVICES_ENV}=0,1,... or use --executor local"
    )


@EXECUTORS.register("local_gpus")
def _execute_local_gpus(
    plan: StudyPlan,
    sdir: Path,
    *,
    profile: dict,
    wait: bool,
    max_parallel: int | None,
    timeout_s: float | None,
    poll_s: float,
) -> ExecutionSummary:
    """One local process per stage, one stage per device slot at a time; a stage starts once its inputs are done."""
    if not wait:
        raise ValueError("executor='local_gpus' cannot return before the study is done (wait=False); use 'slurm'")
    slots = device_slots()
    if max_parallel:
        slots = slots[: max(1, int(max_parallel))]
    free = list(range(len(slots)))  # slot indices not running a job
    setup = source_setup(plan)
    deadline = None if timeout_s is None else time.time() + timeout_s
    tally = Tally(sdir)
    order = [s for wave in waves(plan) for s in wave]  # topological: inputs before their dependents
    total = len(order)
    todo: list[Stage] = []
    for stage in order:
        if already_done(tally, sdir, stage):
            tally.skipped.append(stage.id)
        else:
            todo.append(stage)
    finished = set(tally.skipped)
    running: dict[str, tuple[Stage, Any, int, float]] = {}  # id -> (stage, job, slot, start time)
    say(f"local_gpus: {len(slots)} slot(s) on device(s) {','.join(slots)}")
    try:
        while todo or running:
            for stage in list(todo):
                if tally.bad(stage):
                    todo.remove(stage)
                    tally.blocked.append(stage.id)
                elif free and all(d in finished for d in stage.inputs.values()):
                    if lock_holder(stage_dir(sdir, stage.id))[1]:
                        # another run of this study holds it: look again on the next poll rather than hold a GPU
                        # (once it is free, run_stage returns the other run's record if it finished)
                        continue
                    todo.remove(stage)
                    slot = free.pop(0)
                    job = _submit(sdir, stage, profile, setup, slots[slot])
                    tally.submitted[stage.id] = str(job.job_id)
                    running[stage.id] = (stage, job, slot, time.time())
                    say(
                        f"[{len(tally.submitted)}/{total}] {stage.id} started on device {slots[slot]} "
                        f"(local job {job.job_id}; log {job.paths.stderr})"
                    )
            for sid, (stage, job, slot, t0) in list(running.items()):
                if job.done():
                    del running[sid]
                    free.append(slot)
                    free.sort()
                    settle(tally, sdir, stage, lambda job=job: _local_failure(job))
                    if sid in tally.done:
                        finished.add(sid)
                    say_end(tally, sid, time.time() - t0)
            if deadline is not None and time.time() > deadline and (running or todo):
                tally.pending.extend(running)
                tally.pending.extend(s.id for s in todo)
                break
            if running or todo:
                time.sleep(min(poll_s, 0.2))
    except BaseException as e:
        _cancel_local_jobs(sdir, {sid: (s, j) for sid, (s, j, _, _) in running.items()}, type(e) is KeyboardInterrupt)
        raise
    return tally.summary()


def _submit(sdir: Path, stage: Stage, profile: dict, setup: list[str], device: str) -> Any:
    """Submit `stage` as a local job that sees only `device`; writes submitted.json (status names the log)."""
    cls = STAGE_KINDS.get(stage.kind).resources
    res = {**profile["defaults"], **profile["resources"].get(cls, {}), **profile["overrides"]}
    ex = submitit.AutoExecutor(folder=sdir / JOBS / "%j", cluster="local")  # never auto-detect SLURM
    # gpus_per_node=1 keeps submitit from blanking CUDA_VISIBLE_DEVICES; the export (run after submitit's own
    # environment) then names the slot's device, whatever submitit renumbered
    ex.update_parameters(
        timeout_min=int(res.get("timeout_min", LOCAL_TIMEOUT_MIN)),
        gpus_per_node=1,
        local_setup=[*setup, f"export CUDA_VISIBLE_DEVICES={shlex.quote(device)}"],
        name=stage.kind,
    )
    with contextlib.suppress(FileNotFoundError):  # an old failure is not this attempt's
        os.unlink(stage_dir(sdir, stage.id) / ERROR)
    job = ex.submit(job_for(sdir, stage))
    atomic_write_json(
        stage_dir(sdir, stage.id) / SUBMITTED,
        {
            "executor": "local_gpus",
            "job_id": str(job.job_id),
            "device": device,
            "time": now_iso(),
            "time_unix": time.time(),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        },
    )
    return job


if __name__ == "__main__":  # pragma: no cover - `python -m fsdfm.launch.gpus`: which slots this machine has
    try:
        print(",".join(device_slots()))
    except NoDevicesError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
