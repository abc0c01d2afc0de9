"""Asking SLURM about jobs: their states (sacct, then squeue), array ids, and why a job ended without a record.

Knows the scheduler's commands and states; nothing here submits anything (`fsdfm.launch.slurm` does).
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from fsdfm.io import read_json
from fsdfm.launch.outcomes import job_exception
from fsdfm.records import JOBS, SUBMITTED


SLURM_ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
    "SIGNALING",
    "STAGE_OUT",
    "SPECIAL_EXIT",
    "RESV_DEL_HOLD",
}
UNKNOWN_GRACE_S = 120.0  # sacct/squeue may not know a job for a moment after sbatch returns
RECORD_GRACE_S = 30.0  # a job that COMPLETED may show its record a little later on a network filesystem


def expand_job_ids(jid: str) -> list[str]:
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
    commands = [
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(mains)],
        ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(mains)],
    ]
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
            for j in expand_job_ids(jid):
                states.setdefault(j, state.split()[0].rstrip("+").upper())  # "CANCELLED by 0" -> CANCELLED
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def slurm_failure(out: Path, jid: str, state: str, sdir: Path) -> str:
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
