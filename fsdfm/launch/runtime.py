"""Process-level settings for the processes that run stages (the CLI and every job it starts).

glibc's malloc serves large requests with fresh mmap'd pages and gives freed memory back to the OS; a sampler that
allocates (B, L, V) logits and work buffers every step then pays page faults on every step. In a fresh process on
CPU a 64-step DFM sampling stage (batch 64, L = 64, V = 2,048) measured 28-29 s; the same stage after 45 minutes of
training in the same process (whose malloc had grown its thresholds) 17.6-17.8 s, and in a fresh process with the
settings below 16.6 s. Timings must not depend on what a process did before, so the stage processes set them once,
at start. `FSDFM_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h) and the values measured above
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}

_state: dict[str, bool | None] = {"malloc_tuned": None}


def tune_malloc() -> bool:
    """Raise glibc malloc's mmap threshold (32 MiB, its maximum), trim threshold (1 GiB) and top pad (256 MiB), so
    that freed memory is reused instead of returned and re-faulted. True when applied; False on other C libraries
    or platforms, or with FSDFM_MALLOC_TUNING=0. Idempotent; the result is kept for provenance (`malloc_tuned`)."""
    if _state["malloc_tuned"] is not None:
        return bool(_state["malloc_tuned"])
    applied = False
    if os.environ.get("FSDFM_MALLOC_TUNING", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # glibc; musl has no mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            applied = all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
    _state["malloc_tuned"] = applied
    return applied


def malloc_tuned() -> bool | None:
    """Whether `tune_malloc` applied the settings in this process (None: it was never called)."""
    return _state["malloc_tuned"]
