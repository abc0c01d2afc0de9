"""Benchmark: one call of the exact oracle posterior (forward-backward) against one forward of the `tiny` DiT.

The exact denoiser (fsdfm.oracle_posterior.ExactPosterior) is sampled like a model, so one call must cost no more
than one network forward. Setup (not timed): a sparse first-order Markov source (V = 64, support 4), a batch of
states x_t on the mask and on the uniform path at t = 0.5, and a randomly initialised `tiny` DiT of the same shape
(benchlib.random_dit; cost does not depend on the weights). Timed: medians of wall and CPU time per call, float64
and float32 posteriors. The ratio posterior / DiT forward (< 1: cheaper than the network) is the headline.

    python benchmarks/bench_oracle_posterior.py [--vocab 64] [--batch 256] [--len 64] [--order 1] [--threads 1]
"""

from __future__ import annotations

import argparse

import benchlib
import torch

from fsdfm.data.oracle import MarkovSource
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import make_path
from fsdfm.schedulers import make_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_common_args(parser)
    benchlib.add_shape_args(parser)
    parser.add_argument("--order", type=int, default=1)
    args = parser.parse_args()
    device = benchlib.setup(args)
    V = args.vocab or (16 if args.quick else 64)
    B = args.batch or (8 if args.quick else 256)
    L = args.len or (16 if args.quick else 64)
    repeats = 2 if args.quick else 5
    src = MarkovSource(V, order=args.order, support=min(4, V), seed=args.seed, epsilon=0.001)
    model = benchlib.random_dit(V, L, seed=args.seed, preset=args.preset, device=device)
    x_1 = torch.from_numpy(src.sample(B, L, seed=args.seed + 1)).to(device)
    t = torch.full((B,), 0.5, device=device)
    rows, out = [], []
    with torch.no_grad():
        dit = benchlib.measure(lambda: model(x_1, t), repeats=repeats, device=device)
    for source in ("mask", "uniform"):
        path = make_path(make_scheduler("polynomial", n=1.0), source, V)
        x_t = path.sample(x_1, t, torch.Generator(device).manual_seed(0)).x_t
        for dtype in (torch.float64, torch.float32):
            exact = ExactPosterior(src, path, dtype)
            m = benchlib.measure(lambda: exact(x_t, t), repeats=repeats, device=device)
            ratio, cpu_ratio = m.wall_s / dit.wall_s, m.cpu_s / max(dit.cpu_s, 1e-9)
            rows.append(
                [
                    source,
                    str(dtype).removeprefix("torch."),
                    1e3 * m.wall_s,
                    1e3 * m.cpu_s,
                    1e3 * dit.wall_s,
                    1e3 * dit.cpu_s,
                    ratio,
                    cpu_ratio,
                ]
            )
            out.append(
                {
                    "source": source,
                    "dtype": dtype,
                    "posterior_ms": benchlib.rounded(1e3 * m.wall_s),
                    "posterior_cpu_ms": benchlib.rounded(1e3 * m.cpu_s),
                    "ratio_to_dit_forward": benchlib.rounded(ratio),
                    "cpu_ratio_to_dit_forward": benchlib.rounded(cpu_ratio),
                }
            )
    # on a loaded machine wall times wait for the CPU; the CPU-time ratio is the load-independent check
    print(
        benchlib.table(
            ["source", "dtype", "posterior ms", "cpu ms", "DiT fwd ms", "DiT cpu ms", "ratio", "cpu ratio"],
            rows,
            title=f"[1] exact posterior (order {args.order}, V={V}) vs one tiny DiT forward, B={B}, L={L}",
        )
    )
    benchlib.emit(
        {
            "bench": "oracle_posterior",
            "quick": args.quick,
            "vocab": V,
            "batch": B,
            "seq_len": L,
            "order": args.order,
            "dit_forward_ms": benchlib.rounded(1e3 * dit.wall_s),
            "dit_forward_cpu_ms": benchlib.rounded(1e3 * dit.cpu_s),
            "runs": out,
            **benchlib.environment(device),
        }
    )


if __name__ == "__main__":
    main()
