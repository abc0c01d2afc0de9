"""Provenance: where, with what code and on what machine a stage ran (the "provenance" of its record).

Knows git, the installed library versions, the process, the host and the SLURM environment; knows nothing of the
results layout. Everything is asked without importing torch (seconds per job): torch is consulted only when the
stage already imported it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- provenance
RESULTS_DIR = "results"  # the default results root, under the repository: outputs, not sources (see git_state)


@functools.lru_cache(maxsize=None)
def git_state(src: str | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git work tree holding the fsdfm sources; ("unknown", None) outside git.

    dirty counts modified tracked files and untracked, not-ignored files, outside `results/`: what a study writes
    there (reports are un-ignored so they can be committed) is output, not the code that made it, so a report
    written by the last run must not make every later record "dirty"."""
    src = src or str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", src, *args], capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        dirty: bool | None = bool(git("status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR}"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


@functools.lru_cache(maxsize=None)
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Library versions from the installed metadata (no import: torch/transformers cost seconds to import)."""
    out = {"python": platform.python_version()}
    for dist in ("fsdfm", "torch", "transformers", "numpy", "submitit"):
        out[dist] = _version(dist)
    if out["fsdfm"] is None:  # a source checkout that is not pip-installed: the package's own __version__
        # (from sys.modules, not an import: the package that holds this module is always imported already, and an
        # import of it here would make records depend on the package face above it)
        out["fsdfm"] = getattr(sys.modules.get("fsdfm"), "__version__", None)
    return out


def device_name() -> str:
    """The name of the device the stage ran on, for the record: "cuda:<GPU name>" when the stage ran with torch
    and CUDA is available, else "cpu". (Not `fsdfm.methods.common.device()`, which picks the torch.device to run on.)

    Asked after the stage ran: a stage that never imported torch used no GPU, and importing torch just to
    ask would cost seconds in every job."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device())}"
    return "cpu"


def torch_threads() -> int | None:
    """torch's intra-op thread count when the stage imported torch, else None (asked after the stage ran, like
    `device_name`). CPU timings depend on it: on a shared 2-core machine two threads ran 4-10x slower than one."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def loadavg_1min() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was around a timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def slurm_job_id() -> str | None:
    """The SLURM job id of this process ("<array>_<task>" for array tasks), None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def job_id() -> str | None:
    """The SLURM job id, else submitit's local job id, else None (in-process)."""
    return slurm_job_id() or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def find_seeds(config: dict) -> dict:
    """Every `seed` or `*_seed` key of a (nested) config, by dotted path: {"train.seed": 1, "sample.seed": 3}."""
    out: dict = {}

    def walk(x: Any, p: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                q = f"{p}.{k}" if p else k
                if (k == "seed" or k.endswith("_seed")) and not isinstance(v, (dict, list)):
                    out[q] = v
                else:
                    walk(v, q)

    walk(config, "")
    return out


def provenance() -> dict:
    """Where and with what this process runs (the per-process part of a record's provenance)."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "job_id": job_id(),
        # the GPU(s) the job was given (the local_gpus executor sets one per job; SLURM sets it too)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "argv": list(sys.argv),
        # how the torch thread count was chosen (--threads N, OMP_NUM_THREADS, or `auto: ...` by fsdfm run)
        "threads_source": os.environ.get("FSDFM_THREADS_SOURCE"),
    }
