"""Benchmark: training throughput of the DFM teacher (`DFMObjective`) and the FS-DFM student (`FSDFMObjective` with
the rk4 and heun shortcut teachers), with a randomly initialised `tiny` DiT (V = 2048 by default) trained by
`fsdfm.train.fit` (AdamW, grad clip, EMA: the real loop).

Network passes are counted, not inferred: the model handed to `fit` is wrapped in `PassCounter`, which counts
forward calls with gradient (the student itself), without gradient (the shortcut teacher, which `fit`'s EMA copy of
the wrapper evaluates) and backward passes through the output, each also weighted by the rows it carried. The
student's cost per step is reported in teacher-forward units: (wall per step) / (one no-grad forward of the whole
batch), and as counted forward/backward row-equivalents per step (rows / batch). Only the shortcut rows (h > h_min;
about half the batch under P(h) ~ 1/h with K = 10) call the shortcut teacher.

tokens/s = batch x L x steps / wall of `fit` (forward, backward, optimiser and EMA), median over repeats of a fresh
`fit`, after an untimed warm-up fit. Peak memory: process peak RSS of the timed fits. Prints a table, then one JSON
line.

    python benchmarks/bench_training.py [--quick] [--threads 1] [--batch 16] [--len 128] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from benchlib import (
    MiB,
    add_common_args,
    add_shape_args,
    count_flops,
    emit,
    environment,
    maybe_compile,
    measure,
    mfu,
    random_dit,
    rounded,
    setup,
    table,
)
from fsdfm.metrics.timing import peak_memory, reset_peak_memory
from fsdfm.objectives import DFMObjective, FSDFMConfig, FSDFMObjective
from fsdfm.paths import make_path
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.train import OptimConfig, fit


class PassCounter(nn.Module):
    """`model` with counters: forward calls with gradient (`grad_calls`, `grad_rows`), without (`nograd_calls`,
    `nograd_rows`), and backward passes through its output (`backward_calls`, `backward_rows`, counted when the
    gradient reaches the output). A deep copy (fit's EMA) counts on its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.grad_calls = self.grad_rows = self.nograd_calls = self.nograd_rows = 0
        self.backward_calls = self.backward_rows = 0

    def forward(self, x, *args, **kwargs):
        out = self.model(x, *args, **kwargs)
        rows = x.shape[0]
        if out.requires_grad:
            self.grad_calls += 1
            self.grad_rows += rows
            out.register_hook(self._backward_counter(rows))
        else:
            self.nograd_calls += 1
            self.nograd_rows += rows
        return out

    def _backward_counter(self, rows: int):
        def hook(grad):
            self.backward_calls += 1
            self.backward_rows += rows

        return hook

    def counts(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("grad_calls", "grad_rows", "nograd_calls", "nograd_rows", "backward_calls", "backward_rows")
        }


def objectives(path) -> dict:
    return {
        "teacher_dfm": (DFMObjective(path), "none"),
        "student_rk4": (FSDFMObjective(path, FSDFMConfig(shortcut="rk4")), "log2"),
        "student_heun": (FSDFMObjective(path, FSDFMConfig(shortcut="heun")), "log2"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed optimiser steps per fit")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--source", default="mask", choices=["mask", "uniform"])
    parser.add_argument("--objectives", default="teacher_dfm,student_rk4,student_heun")
    args = parser.parse_args(argv)
    device = setup(args)
    q = args.quick
    V, B, L = args.vocab or (256 if q else 2048), args.batch or (4 if q else 16), args.len or (32 if q else 128)
    steps, repeats = args.steps or (3 if q else 10), args.repeats or (1 if q else 3)
    path = make_path(PolynomialScheduler(1), args.source, V)
    data = torch.randint(V, (max(4 * B, 256), L), generator=torch.Generator().manual_seed(args.seed))
    env = environment(device)
    print(
        f"bench_training: {args.preset} DiT (random init), V {V}, batch {B}, L {L}, {steps} timed steps x {repeats} fits, "
        f"{args.source} source; {env['device']}, {env['threads']} threads, load average {env['loadavg_1min']}"
    )

    teacher = random_dit(V, L, preset=args.preset, seed=args.seed, device=device)
    x = path.source.sample((B, L), generator=torch.Generator(device).manual_seed(0), device=device)
    t = torch.full((B,), 0.5, device=device)
    fwd_model = maybe_compile(teacher, args.compile)
    with torch.no_grad():
        fwd = measure(lambda: fwd_model(x, t), repeats=5, warmup=2, device=device)
    print(f"teacher forward (no grad, batch {B}): {1e3 * fwd.wall_s:.1f} ms  (the teacher-forward unit)")

    chosen = objectives(path)
    names = [n for n in args.objectives.split(",") if n]
    unknown = set(names) - set(chosen)
    if unknown:
        raise SystemExit(f"unknown --objectives {sorted(unknown)}; choose from {sorted(chosen)}")
    cfg = OptimConfig(steps=steps, batch_size=B, lr=1e-4, warmup_steps=1, ema_decay=0.999, seed=args.seed, ckpt_every=0)
    results, rows = {}, []
    for name in names:
        objective, h_embedding = chosen[name]
        base = random_dit(V, L, preset=args.preset, seed=args.seed, h_embedding=h_embedding, device=device).train()

        def one_fit(cfg=cfg, objective=objective, base=base):
            model = PassCounter(maybe_compile(copy.deepcopy(base), args.compile))
            res = fit(model, objective, data, cfg, device=device, progress=False)
            return res, model.counts(), res.ema.counts()

        one_fit(cfg=OptimConfig(**{**cfg.to_dict(), "steps": 2}))  # warm-up (and compilation)
        reset_peak_memory(device)
        fits = [one_fit() for _ in range(repeats)]
        peak, kind = peak_memory(device)
        walls = [res.wall_s for res, _, _ in fits]
        wall = statistics.median(walls)
        # FLOPs of one whole fit (forward, backward; the same h draws as the timed fits), counted, not timed
        flops = count_flops(one_fit) if device.type == "cuda" else None
        util = mfu(flops, wall, device) if flops else None
        res, grad, ema = fits[-1]  # counts of the last fit (each fit draws the same h sequence: same seed)
        per_step = wall / steps
        rec = {
            "steps": steps,
            "repeats": repeats,
            "wall_s": rounded(wall),
            "tokens_per_s": rounded(statistics.median(r.tokens_per_s for r, _, _ in fits)),
            "step_ms": rounded(1e3 * per_step),
            "teacher_forward_units_per_step": rounded(per_step / fwd.wall_s),
            "grad_forward_calls": grad["grad_calls"],
            "backward_calls": grad["backward_calls"],
            "teacher_forward_calls": ema["nograd_calls"] + grad["nograd_calls"],
            "forward_row_equiv_per_step": rounded(
                (grad["grad_rows"] + grad["nograd_rows"] + ema["nograd_rows"]) / (B * steps)
            ),
            "backward_row_equiv_per_step": rounded(grad["backward_rows"] / (B * steps)),
            "peak_mem_mib": rounded(peak / MiB),
            "peak_mem_kind": kind,
            "counts_student": grad,
            "counts_ema": ema,
            "flops_per_step": rounded(flops / steps) if flops else None,
            "mfu": rounded(util) if util else None,
        }
        results[name] = rec
        rows.append(
            [
                name,
                rec["tokens_per_s"],
                rec["step_ms"],
                rec["teacher_forward_units_per_step"],
                rec["grad_forward_calls"] / steps,
                rec["teacher_forward_calls"] / steps,
                rec["forward_row_equiv_per_step"],
                rec["backward_calls"] / steps,
                rec["backward_row_equiv_per_step"],
                rec["peak_mem_mib"],
                "n/a" if util is None else util,
            ]
        )
        print(f"  {name}: {rec['tokens_per_s']:.0f} tokens/s", flush=True)
    print(
        table(
            [
                "objective",
                "tokens/s",
                "ms/step",
                "teacher-fwd units/step",
                "grad fwd calls/step",
                "no-grad fwd calls/step",
                "fwd row-equiv/step",
                "bwd calls/step",
                "bwd row-equiv/step",
                "peak MiB",
                "MFU",
            ],
            rows,
            title=f"\ntraining throughput (median over {repeats} fits of {steps} steps; counts from the last fit)",
        )
    )
    if "teacher_dfm" in results:
        base_rate = results["teacher_dfm"]["tokens_per_s"]
        for name, rec in results.items():
            rec["relative_to_teacher"] = rounded(rec["tokens_per_s"] / base_rate)
    record = {
        "bench": "training",
        "quick": q,
        **env,
        "vocab": V,
        "batch": B,
        "seq_len": L,
        "source": args.source,
        "model": args.preset,
        "compile": args.compile,
        "teacher_forward_ms": rounded(1e3 * fwd.wall_s),
        "teacher_forward_peak_mem_mib": rounded(fwd.peak_mem_bytes / MiB),
        "objectives": results,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "timestamp": time.time(),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
