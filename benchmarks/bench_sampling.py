"""Benchmark: the cost of discrete flow-matching sampling (`fsdfm.samplers.sample`) with a randomly initialised
`tiny` DiT (V = 2048 by default; quality is irrelevant to cost). Four measurements:

1. sweep    wall-clock vs the step budget 1, 2, 4, ..., 1024 for each update rule (euler, cumulative_scalar,
            mixture_euler) at a fixed model, batch and L; every budget is measured, none extrapolated. NFE is
            counted by a wrapper around the model and must equal the budget.
2. speed-up the wall-clock speed-up of 8-step over 1024-step sampling (from the sweep) next to the NFE ratio 128.
3. share    the share of sampler time spent outside the model forward at batch 64, L = 256, per source, measured
            two ways: (a) 1 - (time inside the model's forward calls) / (loop time) with the real model, and (b) the
            loop time with a stand-in returning precomputed logits (the sampler's own work only) / the loop time with
            the real model. Target: <= 5% on CPU. --profile prints torch.profiler's top ops of that own work.
4. scaling  per-step cost vs L (128, 256, 512, 1024) at a fixed batch and vs batch (1, 4, 16, 64) at L = 256.

Timings are medians over repeats (fewer for the long budgets: one 1024-step run averages over 1024 steps) with the
process CPU time beside them; peak memory is the process peak RSS of the timed calls (CUDA: max allocated).
Prints tables, then one JSON line.

    python benchmarks/bench_sampling.py [--quick] [--threads 1] [--sections sweep,share,scaling] [--profile]
                                        [--compile] [--autocast] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from benchlib import (
    MiB,
    TimedForward,
    add_common_args,
    count_flops,
    emit,
    environment,
    maybe_compile,
    mfu,
    random_dit,
    rounded,
    setup,
    table,
)
from fsdfm.metrics.timing import peak_memory, reset_peak_memory
from fsdfm.paths import MixturePath, make_path
from fsdfm.samplers import UPDATE_RULES, sample
from fsdfm.schedulers import PolynomialScheduler

SECTIONS = ("sweep", "share", "scaling")


@dataclass(frozen=True)
class SamplerRun:
    """One configuration, medians over `repeats` runs: wall (the sampling loop), forward (inside the model's
    calls), outside_share = median of 1 - forward / wall, CPU seconds, NFE counted, peak memory."""

    source: str
    rule: str
    batch: int
    seq_len: int
    budget: int
    repeats: int
    nfe: int
    wall_s: float
    forward_s: float
    cpu_s: float
    outside_share: float
    per_step_ms: float
    tokens_per_s: float
    peak_mem_mib: float
    peak_mem_kind: str
    walls: tuple[float, ...]
    mfu: float | None = None  # counted forward FLOPs x NFE / wall / the GPU's bf16 peak (None on CPU)


def run_sampler(
    model: nn.Module,
    path: MixturePath,
    source: str,
    rule: str,
    batch: int,
    seq_len: int,
    budget: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
    sample_kw: dict | None = None,
    forward_flops: int | None = None,
) -> SamplerRun:
    """Sample `batch` sequences `repeats` times on a uniform grid of `budget` steps; the caller warms up.
    sample_kw: `sample`'s autocast / precision / sparse; forward_flops: the counted FLOPs of one forward at this
    shape (for MFU)."""
    timed = TimedForward(model, device)
    walls, fwds, cpus, shares = [], [], [], []
    reset_peak_memory(device)
    for r in range(repeats):
        timed.reset()
        c0 = time.process_time()
        out = sample(
            timed,
            path,
            n_samples=batch,
            seq_len=seq_len,
            n_steps=budget,
            rule=rule,
            device=device,
            generator=torch.Generator(device).manual_seed(seed + r),
            **(sample_kw or {}),
        )
        cpus.append(time.process_time() - c0)
        if not (timed.calls == out.nfe == budget):
            raise RuntimeError(
                f"NFE mismatch: {timed.calls} forward calls, SampleOutput.nfe={out.nfe}, budget {budget}"
            )
        walls.append(out.wall_s)
        fwds.append(timed.seconds)
        shares.append(max(0.0, 1.0 - timed.seconds / out.wall_s))
    peak, kind = peak_memory(device)
    wall = statistics.median(walls)
    util = mfu(forward_flops * budget, wall, device) if forward_flops else None
    return SamplerRun(
        source,
        rule,
        batch,
        seq_len,
        budget,
        repeats,
        timed.calls,
        wall,
        statistics.median(fwds),
        statistics.median(cpus),
        statistics.median(shares),
        1e3 * wall / budget,
        batch * seq_len / wall,
        peak / MiB,
        kind,
        tuple(walls),
        util,
    )


def warm(
    model: nn.Module, path: MixturePath, batch: int, seq_len: int, device: torch.device, sample_kw: dict | None = None
) -> dict:
    """One untimed 2-step run at this shape: allocator, kernels (and compilation with --compile). Returns the run's
    numerics (`SampleNumerics.to_dict`)."""
    return sample(
        model,
        path,
        n_samples=batch,
        seq_len=seq_len,
        n_steps=2,
        device=device,
        generator=torch.Generator(device).manual_seed(12345),
        **(sample_kw or {}),
    ).numerics.to_dict()


def forward_flops(
    model: nn.Module, path: MixturePath, batch: int, seq_len: int, device: torch.device, autocast: bool
) -> int:
    """FLOPs of one forward of `model` at (batch, seq_len), counted by torch's FlopCounterMode."""
    x = path.source.sample((batch, seq_len), generator=torch.Generator(device).manual_seed(0), device=device)
    t = torch.full((batch,), 0.5, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return count_flops(lambda: model(x, t))


class Precomputed(nn.Module):
    """Stand-in for the model: returns the same precomputed logits at every call (its cost is ~0)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x, t, h=None):
        return self.logits


def repeats_for(budget: int, quick: bool) -> int:
    """Short runs are repeated (median of 7 up to 8 steps, of 3 up to 64); from 128 steps one run averages over
    many steps."""
    if quick:
        return 2 if budget <= 64 else 1
    return 7 if budget <= 8 else 3 if budget <= 64 else 1


# ----------------------------------------------------------------------------------------------------- sections


def sweep(args, device) -> tuple[list[SamplerRun], dict]:
    V, B, L = args.vocab, args.sweep_batch, args.sweep_len
    model = maybe_compile(random_dit(V, L, preset=args.preset, seed=args.seed, device=device), args.compile)
    path = make_path(PolynomialScheduler(1), args.sweep_source, V)
    args.numerics = warm(model, path, B, L, device, args.sample_kw)
    flops = forward_flops(model, path, B, L, device, args.autocast)
    runs = []
    for rule in args.rules:
        for budget in args.budgets:
            runs.append(
                run_sampler(
                    model,
                    path,
                    args.sweep_source,
                    rule,
                    B,
                    L,
                    budget,
                    repeats_for(budget, args.quick),
                    device,
                    args.seed,
                    args.sample_kw,
                    flops,
                )
            )
            print(f"  sweep {rule:>17} {budget:>5} steps: {runs[-1].wall_s:8.3f} s", flush=True)
    print(
        table(
            [
                "rule",
                "steps",
                "NFE",
                "repeats",
                "wall s",
                "ms/step",
                "fwd share",
                "outside share",
                "tokens/s",
                "samples/s",
                "MFU",
                "peak MiB",
            ],
            [
                [
                    r.rule,
                    r.budget,
                    r.nfe,
                    r.repeats,
                    r.wall_s,
                    r.per_step_ms,
                    r.forward_s / r.wall_s,
                    r.outside_share,
                    r.tokens_per_s,
                    r.batch / r.wall_s,
                    "n/a" if r.mfu is None else r.mfu,
                    r.peak_mem_mib,
                ]
                for r in runs
            ],
            title=f"\n[1] wall-clock vs step budget: {args.sweep_source} source, batch {B}, L {L}, V {V} "
            f"(every budget measured; medians over 'repeats' runs)",
        )
    )
    few, many = args.speedup_pair
    speedup = {}
    rows = []
    for rule in args.rules:
        by = {r.budget: r for r in runs if r.rule == rule}
        if few in by and many in by:
            s = by[many].wall_s / by[few].wall_s
            nfe_ratio = by[many].nfe / by[few].nfe
            share_few = by[few].outside_share
            speedup[rule] = {
                "few_steps": few,
                "many_steps": many,
                "wall_few_s": rounded(by[few].wall_s),
                "wall_many_s": rounded(by[many].wall_s),
                "speedup": rounded(s),
                "nfe_ratio": nfe_ratio,
                "fraction_of_nfe_ratio": rounded(s / nfe_ratio),
                "outside_share_few": rounded(share_few),
                "outside_share_many": rounded(by[many].outside_share),
                "meets_targets": s / nfe_ratio >= 0.95 and share_few <= 0.05,
            }
            rows.append(
                [
                    rule,
                    by[few].wall_s,
                    by[many].wall_s,
                    s,
                    nfe_ratio,
                    s / nfe_ratio,
                    share_few,
                    speedup[rule]["meets_targets"],
                ]
            )
    if "cumulative_scalar" in speedup and "euler" in speedup:  # FS-DFM (cumulative scalar) vs the DFM teacher (euler)
        by_c = {r.budget: r for r in runs if r.rule == "cumulative_scalar"}
        by_e = {r.budget: r for r in runs if r.rule == "euler"}
        s = by_e[many].wall_s / by_c[few].wall_s
        speedup["euler_many_vs_cumulative_scalar_few"] = {
            "speedup": rounded(s),
            "nfe_ratio": many / few,
            "fraction_of_nfe_ratio": rounded(s / (many / few)),
        }
        rows.append(
            [
                f"euler {many} / cum. scalar {few}",
                by_c[few].wall_s,
                by_e[many].wall_s,
                s,
                many / few,
                s * few / many,
                "",
                "",
            ]
        )
    print(
        table(
            [
                "rule",
                f"wall {few} steps s",
                f"wall {many} steps s",
                "speed-up",
                "NFE ratio",
                "speed-up / NFE ratio",
                f"outside share {few}",
                "meets",
            ],
            rows,
            title=f"\n[2] speed-up of {few}-step over {many}-step sampling (targets: >= 0.95 x NFE ratio, "
            f"<= 0.05 of the {few}-step wall outside the forward)",
        )
    )
    return runs, speedup


def share(args, device) -> list[dict]:
    V, B, L = args.vocab, args.share_batch, args.share_len
    model = maybe_compile(random_dit(V, L, preset=args.preset, seed=args.seed, device=device), args.compile)
    results, rows = [], []
    for source in args.sources:
        path = make_path(PolynomialScheduler(1), source, V)
        warm(model, path, B, L, device, args.sample_kw)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            x = path.source.sample((B, L), generator=torch.Generator(device).manual_seed(0), device=device)
            logits = model(x, torch.full((B,), 0.5, device=device))
        standin = Precomputed(logits)
        warm(standin, path, B, L, device, args.sample_kw)
        for budget in args.share_budgets:
            real = run_sampler(
                model,
                path,
                source,
                "cumulative_scalar",
                B,
                L,
                budget,
                args.share_repeats,
                device,
                args.seed,
                args.sample_kw,
            )
            own = run_sampler(
                standin,
                path,
                source,
                "cumulative_scalar",
                B,
                L,
                budget,
                max(3, args.share_repeats),
                device,
                args.seed,
                args.sample_kw,
            )
            share_b = own.wall_s / real.wall_s
            results.append(
                {
                    "source": source,
                    "budget": budget,
                    "batch": B,
                    "seq_len": L,
                    "share_timed_forwards": rounded(real.outside_share),
                    "share_standin": rounded(share_b),
                    "wall_s": rounded(real.wall_s),
                    "forward_s": rounded(real.forward_s),
                    "own_work_s": rounded(own.wall_s),
                    "repeats": real.repeats,
                    "nfe": real.nfe,
                    "peak_mem_mib": rounded(real.peak_mem_mib),
                    "peak_mem_kind": real.peak_mem_kind,
                    "meets_5pct": max(real.outside_share, share_b) <= 0.05,
                }
            )
            rows.append(
                [
                    source,
                    budget,
                    real.nfe,
                    real.wall_s,
                    real.forward_s,
                    own.wall_s,
                    real.outside_share,
                    share_b,
                    real.peak_mem_mib,
                ]
            )
            print(f"  share {source} {budget} steps: {real.outside_share:.3f} / {share_b:.3f}", flush=True)
        if args.profile:
            profile_own_work(standin, path, B, L, device, args)
    print(
        table(
            [
                "source",
                "steps",
                "NFE",
                "loop s",
                "in forward s",
                "own work s (stand-in)",
                "share (a) timed fwd",
                "share (b) stand-in",
                "peak MiB",
            ],
            rows,
            title=f"\n[3] sampler time outside the model forward: cumulative scalar, batch {B}, L {L}, V {V} "
            f"(target <= 0.05; medians over {args.share_repeats} runs)",
        )
    )
    return results


def profile_own_work(standin: nn.Module, path: MixturePath, B: int, L: int, device: torch.device, args) -> None:
    for budget in args.share_budgets:
        with torch.profiler.profile() as prof:
            sample(
                standin,
                path,
                n_samples=B,
                seq_len=L,
                n_steps=budget,
                device=device,
                generator=torch.Generator(device).manual_seed(0),
                **args.sample_kw,
            )
        print(f"\ntorch.profiler: the sampler's own work ({path.source.name} source, {budget} steps, batch {B}, L {L})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def scaling(args, device) -> dict:
    V, steps = args.vocab, args.scaling_steps
    out = {"vs_len": [], "vs_batch": []}
    path = make_path(PolynomialScheduler(1), args.scaling_source, V)
    rows = []
    model = maybe_compile(
        random_dit(V, max(args.lens), preset=args.preset, seed=args.seed, device=device), args.compile
    )
    for kind, configs in (
        ("vs_len", [(args.len_batch, L) for L in args.lens]),
        ("vs_batch", [(B, args.batch_len) for B in args.batches]),
    ):
        for B, L in configs:
            warm(model, path, B, L, device, args.sample_kw)
            r = run_sampler(
                model,
                path,
                args.scaling_source,
                "cumulative_scalar",
                B,
                L,
                steps,
                args.scaling_repeats,
                device,
                args.seed,
                args.sample_kw,
            )
            out[kind].append(
                {
                    "batch": B,
                    "seq_len": L,
                    "steps": steps,
                    "nfe": r.nfe,
                    "per_step_ms": rounded(r.per_step_ms),
                    "us_per_token_step": rounded(1e6 * r.wall_s / steps / (B * L)),
                    "outside_share": rounded(r.outside_share),
                    "peak_mem_mib": rounded(r.peak_mem_mib),
                    "peak_mem_kind": r.peak_mem_kind,
                }
            )
            rows.append([kind, B, L, r.per_step_ms, 1e6 * r.wall_s / steps / (B * L), r.outside_share, r.peak_mem_mib])
            print(f"  scaling batch {B} L {L}: {r.per_step_ms:.1f} ms/step", flush=True)
    print(
        table(
            ["sweep", "batch", "L", "ms/step", "us/token/step", "outside share", "peak MiB"],
            rows,
            title=f"\n[4] per-step cost vs L and vs batch: {args.scaling_source} source, cumulative scalar, "
            f"{steps} steps, V {V}, medians over {args.scaling_repeats} runs",
        )
    )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--vocab", type=int, default=None, help="V (default 2048; --quick: 256)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--rules", default=",".join(UPDATE_RULES.names()))
    parser.add_argument("--budgets", default=None, help="comma-separated step budgets (default 1,2,4,...,1024)")
    parser.add_argument("--sweep-source", default="uniform", choices=["mask", "uniform"])
    parser.add_argument("--sweep-batch", type=int, default=None)
    parser.add_argument("--sweep-len", type=int, default=None)
    parser.add_argument("--sources", default="mask,uniform", help="sources of the share measurement")
    parser.add_argument("--share-budgets", default=None, help="default 1,8")
    parser.add_argument("--share-batch", type=int, default=None)
    parser.add_argument("--share-len", type=int, default=None)
    parser.add_argument("--share-repeats", type=int, default=None)
    parser.add_argument("--scaling-source", default="mask", choices=["mask", "uniform"])
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the sampler's own work")
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="bf16 autocast of the forward and TF32 matmuls (the path of a study with sampling.forward_precision: "
        "bfloat16)",
    )
    parser.add_argument(
        "--precision",
        default="float64",
        choices=["float64", "float32"],
        help="dtype of p and the draws (float64 is the suite's default)",
    )
    parser.add_argument(
        "--sparse",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto/on: the logits step (the default on every device); off: the dense (B, L, V) step",
    )
    args = parser.parse_args(argv)
    args.precision = getattr(torch, args.precision)
    args.sparse = {"auto": None, "on": True, "off": False}[args.sparse]
    args.sample_kw = dict(autocast=args.autocast, precision=args.precision, sparse=args.sparse)
    device = setup(args)
    if args.autocast:  # the path a study with sampling.forward_precision: bfloat16 runs (fsdfm.methods.common)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    q = args.quick
    args.vocab = args.vocab or (256 if q else 2048)
    args.rules = [r for r in args.rules.split(",") if r]
    args.budgets = (
        [int(b) for b in args.budgets.split(",")]
        if args.budgets
        else ([1, 2, 4, 8, 32] if q else [2**k for k in range(11)])
    )
    args.speedup_pair = (8, max(args.budgets))
    args.sweep_batch = args.sweep_batch or (4 if q else 16)
    args.sweep_len = args.sweep_len or (32 if q else 64)
    args.sources = [s for s in args.sources.split(",") if s]
    args.share_budgets = [int(b) for b in args.share_budgets.split(",")] if args.share_budgets else [1, 8]
    args.share_batch = args.share_batch or (8 if q else 64)
    args.share_len = args.share_len or (64 if q else 256)
    args.share_repeats = args.share_repeats or (2 if q else 3)
    args.lens = [32, 64] if q else [128, 256, 512, 1024]
    args.len_batch = 2 if q else 4
    args.batches = [1, 4] if q else [1, 4, 16, 64]
    args.batch_len = 32 if q else 256
    args.scaling_steps = 2 if q else 4
    args.scaling_repeats = 2 if q else 3
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")
    env = environment(device)
    print(
        f"bench_sampling: {args.preset} DiT (random init), V {args.vocab}; {env['device']}, {env['threads']} threads, "
        f"load average {env['loadavg_1min']} on {env['cpu_count']} CPUs; {args.precision} draws, sparse={args.sparse}; "
        f"compile={args.compile}, autocast={args.autocast}"
    )
    record = {
        "bench": "sampling",
        "quick": q,
        **env,
        "vocab": args.vocab,
        "model": args.preset,
        "compile": args.compile,
        "autocast": args.autocast,
        "precision": str(args.precision).removeprefix("torch."),
        "sparse": args.sparse,
        "extrapolated": False,
    }
    if "sweep" in sections:
        runs, speedup = sweep(args, device)
        record["sweep"] = {
            "source": args.sweep_source,
            "batch": args.sweep_batch,
            "seq_len": args.sweep_len,
            "runs": [
                {k: (rounded(v) if isinstance(v, float) else v) for k, v in asdict(r).items() if k != "walls"}
                for r in runs
            ],
        }
        record["speedup"] = speedup
        record["numerics"] = args.numerics
    if "share" in sections:
        record["share"] = share(args, device)
    if "scaling" in sections:
        record["scaling"] = scaling(args, device)
    record["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    emit(record)
    return record


if __name__ == "__main__":
    main()
