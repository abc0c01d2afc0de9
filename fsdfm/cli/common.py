"""What every command shares: the error types that mean exit status 2, the results root default, argument types,
thread settings and reading a study's plan. Knows nothing about any one command."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from fsdfm.records import read_plan
from fsdfm.study.graph import PlanError, StudyPlan

DEFAULT_ROOT = "results"


class InputError(ValueError):
    """Bad command-line input that is not a spec (an unreadable cluster profile, ...): exit 2, one message."""


class UsageError(ValueError):
    """A command line that cannot be carried out as given (exit 2, nothing changed)."""


def _offline_defaults() -> None:
    # The suite never downloads at run time unless asked: a hub lookup would otherwise retry for ~30 s.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _read_plan(sdir: Path) -> dict:
    """plan.json of a study directory; a missing, corrupt or malformed one is a PlanError / FileNotFoundError."""
    plan = read_plan(sdir)
    try:
        StudyPlan.from_dict(plan, str(sdir / "plan.json"))
    except PlanError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise PlanError(f"{sdir / 'plan.json'}: not a valid study plan ({type(e).__name__}: {e})") from None
    return plan


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_thread_env(n: int) -> None:
    """OMP/MKL thread counts in the environment. OpenMP and BLAS read them once, when numpy / torch are first
    imported, so `main` calls this before importing either: the inline executor then computes with the same
    thread pools as the jobs of the local executor (which start fresh processes with this environment)."""
    for key in THREAD_ENV:
        os.environ[key] = str(n)


THREADS_SOURCE_ENV = "FSDFM_THREADS_SOURCE"  # how the thread count was chosen: recorded in each stage's provenance


def auto_threads(max_parallel: int | None) -> tuple[int, str]:
    """(threads per stage, why) when neither --threads nor OMP_NUM_THREADS says: the usable cores not already
    busy (the 1-minute load average counts other jobs' runnable tasks), shared by the `max_parallel` stages that
    run at once, at least 1. On an idle 2-core machine one stage gets 2; at load 10 (9c2f443's `make demo`: 73
    min against 239 s idle, torch's threads fighting other jobs) it gets 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    parallel = max(1, int(max_parallel or 1))
    free = max(1, cores - int(load))
    n = max(1, min(cores, free) // parallel)
    return n, f"auto: {cores} usable cores, load {load:.1f}, {parallel} stage(s) at once -> {n}"


def set_threads(n: int) -> None:
    """n intra-op threads here (inline and debug executors) and in every job this process starts (submitit local
    processes and SLURM jobs inherit the environment)."""
    set_thread_env(n)
    import torch  # heavy: only the commands that compute need it, and only after the thread variables are set

    torch.set_num_threads(n)


# what a bare `pip install fsdfm` lacks for a command: the extra and the modules it brings
EXTRAS = {"report": ("analysis", ("matplotlib", "seaborn", "scipy", "markdown"))}


def require_extra(command: str) -> None:
    """An InputError naming the extra to install when a module `command` needs is missing."""
    extra, modules = EXTRAS[command]
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise InputError(
                f"fsdfm {command} needs the {extra!r} extra (module {name!r} is not installed): "
                f"pip install 'fsdfm[{extra}]'"
            )
