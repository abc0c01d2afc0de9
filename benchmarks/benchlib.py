"""Shared pieces of the cost benchmarks: the randomly initialised model, timing with repeats, peak memory, the
printed table and the closing JSON line.

Every benchmark prints a table and ends with exactly one JSON line (`emit`), so that
`python benchmarks/bench_X.py | tail -n 1` is machine-readable. Timings are wall-clock medians over repeats (a
shared machine is noisy), with the process CPU time beside them; the load average and the thread count are
recorded, since on a loaded 2-core machine two intra-op threads can run several times slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fsdfm.metrics.timing import peak_memory, reset_peak_memory  # noqa: E402
from fsdfm.model import DiT, model_config, student_from_teacher  # noqa: E402

MiB = 1 << 20


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run, seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA timings are synchronised)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (off by default; the first "
        "call of each shape compiles, and warm-up calls absorb it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", help="DiT size: tiny, small (~170M with V=50257) or 1.3b")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """--vocab, --batch and --len (None: the benchmark's own default, smaller with --quick)."""
    parser.add_argument("--vocab", type=int, default=None, help="V (default 2048; --quick: 256)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--len", type=int, default=None)


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def random_dit(
    vocab_size: int,
    seq_len: int,
    seed: int = 0,
    h_embedding: str = "none",
    preset: str = "tiny",
    device: torch.device | str = "cpu",
) -> DiT:
    """A randomly initialised DiT preset over V data tokens plus the mask (input vocabulary V + 1).

    The zero-initialised layers (adaLN modulations, output head) are redrawn N(0, 0.02^2): the cost of a forward
    does not depend on the weights, but all-zero logits would make every p uniform and the sampler's jump pattern
    atypical. With h_embedding != "none" it is the student of that teacher (`student_from_teacher`)."""
    torch.manual_seed(seed)
    model = DiT(model_config(preset, vocab_size, seq_len, input_vocab_size=vocab_size + 1))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.02)
    if h_embedding != "none":
        model = student_from_teacher(model, h_embedding=h_embedding)
    return model.to(device).eval()


# Dense bf16 tensor-core peak (no sparsity: half the data sheets' "with sparsity" figure), FLOP/s, by the device
# folder name (`gpu_folder`). The PCIe and NVL parts run at lower clocks than the SXM ones, so an H100 PCIe taken as
# an SXM would understate its MFU by 24%.
PEAK_BF16_FLOPS = {
    "h100": 989.4e12,  # H100 SXM5
    "h100-pcie": 756.5e12,  # 1,513 TFLOP/s with sparsity
    "h100-nvl": 835.5e12,  # 1,671 with sparsity
    "h200": 989.4e12,  # H200 SXM
    "h200-nvl": 835.5e12,
    "a100": 312e12,  # A100 SXM4 and PCIe alike
    "a100-pcie": 312e12,
}


def gpu_folder(name: str) -> str:
    """The results folder of a GPU from its CUDA / nvidia-smi name: the model in lower case, plus "-pcie" or
    "-nvl" for those form factors (their peaks differ from the SXM part's; an SXM part gets no suffix).

    "NVIDIA H100 80GB HBM3" -> "h100"; "NVIDIA H100 PCIe" -> "h100-pcie"; "NVIDIA A100-SXM4-80GB" -> "a100";
    "NVIDIA A100-PCIE-40GB" -> "a100-pcie"; "NVIDIA H200 NVL" -> "h200-nvl"; "Tesla V100-SXM2-16GB" -> "v100"; "NVIDIA GeForce RTX 4090" -> "rtx4090".
    A name without a model number raises ValueError (so that no run is filed under a wrong folder)."""
    import re

    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w]
    i = next((i for i, w in enumerate(words) if re.fullmatch(r"[a-z]{0,3}\d{2,4}[a-z]?", w) and w[:3] != "sxm"), None)
    if i is None:
        raise ValueError(f"GPU name {name!r}: no model number (such as H100) in it; set GPU_NAME")
    model = words[i] if words[i][0].isalpha() or i == 0 else words[i - 1] + words[i]  # GeForce RTX 4090: rtx4090
    form = next((f for f in ("pcie", "nvl") if f in words), None)
    return f"{model}-{form}" if form else model


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """The data-sheet dense bf16 peak of this CUDA device (FLOP/s), or None (CPU, unknown GPU: no MFU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        return PEAK_BF16_FLOPS.get(gpu_folder(torch.cuda.get_device_name(device)))
    except ValueError:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of fn, counted by torch.utils.flop_counter (matmuls and attention, forward and backward
    as executed: measured on the real graph rather than a 6N formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, device: torch.device | str) -> float | None:
    """Model FLOPs utilisation: flops / seconds / the device's peak (None where the peak is unknown)."""
    peak = peak_bf16_flops(device)
    return None if peak is None or seconds <= 0 else flops / seconds / peak


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when enabled (the GPU path; on CPU it needs a C++ compiler and compiles for a while)."""
    return torch.compile(model) if enabled else model


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Measured:
    """Medians over `repeats` timed calls (after `warmup` untimed ones): wall and process CPU seconds, the peak
    memory of the timed calls (bytes, kind), every wall time, and the last call's return value."""

    wall_s: float
    cpu_s: float
    peak_mem_bytes: int
    peak_mem_kind: str
    walls: tuple[float, ...]
    result: Any = None


def measure(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: torch.device | str = "cpu") -> Measured:
    """Time `fn()` `repeats` times after `warmup` untimed calls (CUDA synchronised); the peak memory covers the
    timed calls only (process peak RSS on CPU, reset through /proc/self/clear_refs where Linux allows it)."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak_memory(device)
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak, kind = peak_memory(device)
    return Measured(statistics.median(walls), statistics.median(cpus), peak, kind, tuple(walls), result)


class TimedForward(nn.Module):
    """`model` whose forward calls are counted and timed (wall, CUDA synchronised): `calls`, `rows` (sum of batch
    sizes seen) and `seconds`. Wrapping costs two perf_counter calls per forward. The model is kept as `.module`
    (as DistributedDataParallel does), so code that unwraps `.module` (fsdfm.ar) sees the Hugging Face model."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        super().__init__()
        self.module, self.device = model, torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.calls, self.rows, self.seconds = 0, 0, 0.0

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["input_ids"]
        sync(self.device)
        t0 = time.perf_counter()
        out = self.module(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += x.shape[0]
        return out


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """A plain-text table (numbers right-aligned), with an optional title line."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def environment(device: torch.device | str) -> dict:
    """What the numbers depend on: device, threads, load, versions."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }


def emit(record: dict) -> None:
    """The closing JSON line."""
    print(json.dumps(record, default=_json_default), flush=True)


def _json_default(value: Any):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def rounded(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
