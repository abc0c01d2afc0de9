"""Cost metrics, counted rather than inferred: NFE, wall-clock and peak memory of a sampling run.

* `CountingModel` wraps the denoiser; every forward call adds one to `nfe` (a sampler that calls the
  model twice per step, or caches a call, is charged what it really did).
* `timed(fn)` runs `fn` `warmup` times untimed (allocator, kernels, caches), then times one call with
  CUDA synchronised before and after, and records the peak memory of that call only:
  CUDA: `torch.cuda.max_memory_allocated` ("cuda_max_allocated"), reset before the timed call;
  CPU:  the process peak resident set size ("process_rss"; Linux VmHWM, reset through
        /proc/self/clear_refs where allowed, otherwise the process-lifetime peak from getrusage).
The evaluator is not part of `fn`, so its time is excluded by construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fsdfm.memory import PeakMemory, _is_cuda, _synchronize, peak_memory, reset_peak_memory  # noqa: F401 (re-exported)
from fsdfm.metrics.registry import register_metric


class CountingModel(nn.Module):
    """`model` with a forward-call counter `nfe`; attributes not found here are looked up on `model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.nfe = 0

    def forward(self, *args, **kwargs):
        self.nfe += 1
        return self.model(*args, **kwargs)

    def reset(self) -> None:
        self.nfe = 0

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (incl. self.model)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds and peak memory of one timed call, plus that call's return value `result`.

    cpu_s: CPU seconds the process used during the call (all its threads, `time.process_time`); on an idle machine
    about wall_s x threads, far less when other jobs took the cores. load_per_core: the 1-minute load average
    over the cores this process may use, the larger of before and after the call (None where the OS has none):
    above 1, more tasks wanted a core than there were, and the wall-clock is not the method's own."""

    wall_s: float
    peak_mem_bytes: int
    peak_mem_kind: str  # "cuda_max_allocated" | "process_rss"
    result: Any = None
    cpu_s: float | None = None
    load_per_core: float | None = None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM or container limit), else cpu_count."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_per_core() -> float | None:
    """The 1-minute load average divided by `usable_cores()` (None where the OS has no load average)."""
    import os

    try:
        return round(os.getloadavg()[0] / usable_cores(), 3)
    except (AttributeError, OSError):
        return None


def timed(fn: Callable[[], Any], warmup: int = 1, device: str | torch.device = "cpu") -> Timing:
    """Call `fn()` `warmup` times untimed, then once timed (synchronised on CUDA); see the module docstring."""
    if warmup < 0:
        raise ValueError(f"timed: warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    reset_peak_memory(device)
    load_before = load_per_core()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    _synchronize(device)
    wall_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    loads = [v for v in (load_before, load_per_core()) if v is not None]
    peak, kind = peak_memory(device)
    return Timing(wall_s, peak, kind, result, cpu_s, max(loads) if loads else None)


def tokens_per_s(n_tokens: int, wall_s: float) -> float:
    """Generated tokens per second; raises on a non-positive time rather than returning inf."""
    if wall_s <= 0:
        raise ValueError(f"tokens_per_s: wall_s must be > 0, got {wall_s}")
    return n_tokens / wall_s


# --- cost, recorded by the sampling stage; evaluator time excluded
_SAMPLING = "the sampling stage (fsdfm.metrics.timing: CountingModel / timed)"
register_metric(
    "nfe",
    direction="min",
    unit="evals",
    family="timing",
    show={"cost": 1},
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="counted model forward calls per sampling run",
)
# the cost table shows wall_s as its `sampling_wall_s` column (fsdfm.report.summary.sampling_wall_s)
register_metric(
    "wall_s",
    direction="min",
    unit="s",
    family="timing",
    label="sampling wall-clock (s)",
    show={"cost": 2},
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="sampling wall-clock seconds (warm-up excluded, CUDA synchronised)",
)
register_metric(
    "tokens_per_s",
    direction="max",
    unit="tok/s",
    family="timing",
    show={"cost": 3},
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="generated tokens per second of sampling wall-clock",
)
register_metric(
    "cpu_s",
    direction=None,
    unit="s",
    family="timing",
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="CPU seconds of the sampling process during the timed draw (all threads): beside wall_s, the share "
    "of the cores the draw really got",
)
register_metric(
    "load_per_core",
    direction=None,
    unit="load/core",
    family="timing",
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="1-minute load average / usable cores around the timed draw (max of before and after); above 1 "
    "the machine was oversubscribed and the report marks the timing",
)
register_metric(
    "peak_mem",
    direction="min",
    unit="bytes",
    family="timing",
    show={"cost": 4},
    recorded_by=_SAMPLING,
    sources=("fsdfm.metrics.timing", "fsdfm.memory"),
    description="peak memory while sampling (CUDA max allocated, or process peak RSS)",
)
