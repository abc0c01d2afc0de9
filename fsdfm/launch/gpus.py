"""The "local_gpus" executor: one machine with several GPUs and no SLURM. Each GPU runs one stage at a time, in its
own submitit local process that sees only that GPU (`CUDA_VISIBLE_DEVICES=<device>`), and the stages of a study
run as soon as their inputs are done (no wave barrier: a sample stage of one teacher starts while another teacher
still trains). The record's provenance keeps the device (`cuda_visible_devices`).

Devices, first found wins:
* `FSDFM_DEVICES` ("0,1,2,3"; a device named twice gets two slots, "0,0,1,1" runs two stages per GPU);
* this process's `CUDA_VISIBLE_DEVICES` (each entry one slot);
* `nvidia-smi -L` (GPUs 0..n-1).
`max_parallel` caps the slots in use at once. Without a device the executor refuses to start (use "local").

The local executor's ready queue runs them (`fsdfm.launch.local.run_slots`, one slot per device), with its job
cancelling: Ctrl-C, SIGTERM or an error in the driver stops every job and releases its lock.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fsdfm.launch.executors import EXECUTORS
from fsdfm.launch.local import nvidia_smi_gpus, run_slots
from fsdfm.launch.outcomes import ExecutionSummary, say
from fsdfm.study.graph import StudyPlan

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
    n = nvidia_smi_gpus()
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
    say(f"local_gpus: {len(slots)} slot(s) on device(s) {','.join(slots)}")
    return run_slots(plan, sdir, profile, slots, "local_gpus", timeout_s=timeout_s, poll_s=poll_s)


if __name__ == "__main__":  # pragma: no cover - `python -m fsdfm.launch.gpus`: which slots this machine has
    try:
        print(",".join(device_slots()))
    except NoDevicesError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
