"""Device memory probes: the peak memory of a window of work, on CUDA (allocator statistics) or the CPU (the
process's peak RSS). A leaf below every model and sampler: it knows nothing of metrics, stages or records, so a
sampler that measures its own loop (fsdfm.flm) needs nothing above the library floor. `fsdfm.metrics.timing`
builds the recorded peak_mem metric on it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import NamedTuple

import torch


class PeakMemory(NamedTuple):
    """Peak memory in `bytes` and how it was measured (`kind`); unpacks as `peak, kind = peak_memory(dev)`."""

    bytes: int
    kind: str  # "cuda_max_allocated" | "process_rss"


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _synchronize(device: str | torch.device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _vm_hwm_bytes() -> int | None:
    """Linux peak RSS (VmHWM) of this process, in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: str | torch.device = "cpu") -> None:
    """Start a new peak-memory window (CUDA allocator stats, or the process's VmHWM on Linux)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 resets the peak RSS watermark (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not permitted / not Linux: the peak then covers the whole process lifetime


def peak_memory(device: str | torch.device = "cpu") -> PeakMemory:
    """Peak memory since the last `reset_peak_memory(device)`."""
    if _is_cuda(device):
        return PeakMemory(int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated")
    hwm = _vm_hwm_bytes()
    if hwm is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = rss if sys.platform == "darwin" else rss * 1024
    return PeakMemory(int(hwm), "process_rss")
