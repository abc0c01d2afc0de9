"""Benchmark: time per sample at equal length -- the autoregressive baseline (a GPT-2 of the DiT's width and depth,
`fsdfm.ar.sample_ar` with and without its KV cache) against DFM / FS-DFM sampling (`fsdfm.samplers.sample`) with a
randomly initialised `tiny` DiT, V = 2048 by default.

Rows: AR with KV cache (NFE = L), AR without cache (NFE = L, the full prefix every step), the DFM teacher at L steps
(equal NFE, euler), the FS-DFM student (h-conditioned, cumulative scalar) at 8 and 1 steps, and optionally the teacher
at 1024 steps (--teacher-steps). Cost only: models are untrained. "At equal quality" needs trained models -- it comes
from the methods study (experiments/methods.yaml: gen_ppl next to wall_s), not from this benchmark; the last column
gives how many DFM steps fit in the AR+cache time (equal wall-clock). Medians over repeats; peak memory is the process
peak RSS of the timed calls. Prints a table, then one JSON line.

    python benchmarks/bench_ar.py [--quick] [--threads 1] [--batch 16] [--len 128] [--teacher-steps 1024] [--compile]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchlib import (
    MiB,
    TimedForward,
    add_common_args,
    add_shape_args,
    emit,
    environment,
    maybe_compile,
    measure,
    random_dit,
    rounded,
    setup,
    table,
)
from fsdfm.paths import make_path
from fsdfm.samplers import sample
from fsdfm.schedulers import PolynomialScheduler


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    add_shape_args(parser)
    parser.add_argument("--source", default="uniform", choices=["mask", "uniform"])
    parser.add_argument("--student-steps", default="8,1")
    parser.add_argument("--teacher-steps", default="", help="extra teacher budgets, e.g. 1024")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--ar-cache",
        default="on,off",
        help="AR rows to time: on (KV cache), off (the full prefix every step; quadratic in L, ~60 s per call at "
        "L 1,024 on an H100), or both",
    )
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast of every forward (the GPU path)")
    args = parser.parse_args(argv)
    ar_cache_modes = {"on": True, "off": False}
    unknown = set(args.ar_cache.split(",")) - set(ar_cache_modes) - {""}
    if unknown:
        raise SystemExit(f"--ar-cache: unknown {sorted(unknown)}; choose from on, off")
    device = setup(args)
    q = args.quick
    V, B, L = args.vocab or (256 if q else 2048), args.batch or (4 if q else 16), args.len or (32 if q else 128)
    repeats = args.repeats or (2 if q else 3)
    env = environment(device)
    print(
        f"bench_ar: equal length L {L}, batch {B}, V {V}; {args.preset} width/depth for both; {env['device']}, "
        f"{env['threads']} threads, load average {env['loadavg_1min']}"
    )

    try:
        from fsdfm.ar import ARConfig, build_ar, sample_ar
    except ImportError as e:  # the AR module is optional for this benchmark
        sample_ar = None
        print(f"fsdfm.ar is not importable ({e}): AR rows skipped")
    teacher = maybe_compile(random_dit(V, L, preset=args.preset, seed=args.seed, device=device), args.compile)
    student = maybe_compile(
        random_dit(V, L, preset=args.preset, seed=args.seed, h_embedding="log2", device=device), args.compile
    )
    path = make_path(PolynomialScheduler(1), args.source, V)
    runs = []

    def record(method: str, nfe: int, m, nfe_counted: int) -> None:
        if nfe_counted != nfe:
            raise RuntimeError(f"{method}: counted {nfe_counted} network evaluations, expected {nfe}")
        runs.append(
            {
                "method": method,
                "nfe": nfe,
                "wall_s": rounded(m.wall_s),
                "ms_per_sample": rounded(1e3 * m.wall_s / B),
                "tokens_per_s": rounded(B * L / m.wall_s),
                "peak_mem_mib": rounded(m.peak_mem_bytes / MiB),
                "peak_mem_kind": m.peak_mem_kind,
                "repeats": len(m.walls),
            }
        )
        print(f"  {method}: {m.wall_s:.3f} s", flush=True)

    if sample_ar is not None:
        torch.manual_seed(args.seed)
        ar = build_ar(ARConfig.from_model_config(teacher.cfg), bos_id=0).to(device).eval()
        ar = maybe_compile(ar, args.compile)
        for use_cache in [ar_cache_modes[c] for c in args.ar_cache.split(",") if c]:
            counted = TimedForward(ar, device)

            def run_ar(use_cache=use_cache, counted=counted):
                counted.reset()
                return sample_ar(
                    counted, B, L, bos_id=0, generator=torch.Generator(device).manual_seed(1), use_cache=use_cache
                )

            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
                m = measure(run_ar, repeats=repeats, warmup=1, device=device)
            record(f"AR, KV cache={use_cache}", L, m, counted.calls)
            assert m.result.nfe == L

    def run_dfm(method: str, model, steps: int, rule: str, h_conditioned: bool, reps: int) -> None:
        counted = TimedForward(model, device)

        def go():
            counted.reset()
            return sample(
                counted,
                path,
                n_samples=B,
                seq_len=L,
                n_steps=steps,
                rule=rule,
                h_conditioned=h_conditioned,
                generator=torch.Generator(device).manual_seed(1),
                device=device,
                autocast=args.autocast,
            )

        # The 2-step warm-up below has already run the DiT at this shape: a long run (L or 1,024 steps) needs no
        # untimed copy of itself, which would double the teacher's time (issue 28: 2 x 1,024 fp32 steps overran).
        m = measure(go, repeats=reps, warmup=1 if steps <= 64 else 0, device=device)
        record(method, steps, m, counted.calls)

    sample(
        teacher, path, n_samples=B, seq_len=L, n_steps=2, device=device, autocast=args.autocast
    )  # warm-up of the DiT at this shape
    run_dfm(f"DFM teacher, {L} steps (equal NFE), euler", teacher, L, "euler", False, repeats)
    for steps in [int(s) for s in args.student_steps.split(",") if s]:
        run_dfm(
            f"FS-DFM student, {steps} steps, cumulative scalar",
            student,
            steps,
            "cumulative_scalar",
            True,
            max(repeats, 5),
        )
    for steps in [int(s) for s in args.teacher_steps.split(",") if s]:
        run_dfm(f"DFM teacher, {steps} steps, euler", teacher, steps, "euler", False, 1)

    ar_cache = next((r for r in runs if r["method"] == "AR, KV cache=True"), None)
    dfm_step = next(r for r in runs if r["method"].startswith("DFM teacher, "))
    per_step_s = dfm_step["wall_s"] / dfm_step["nfe"]
    for r in runs:
        r["relative_to_ar_cache"] = rounded(r["wall_s"] / ar_cache["wall_s"]) if ar_cache else None
    print(
        table(
            ["method", "NFE", "wall s (batch)", "ms/sample", "tokens/s", "x AR+cache time", "peak MiB"],
            [
                [
                    r["method"],
                    r["nfe"],
                    r["wall_s"],
                    r["ms_per_sample"],
                    r["tokens_per_s"],
                    r["relative_to_ar_cache"] if ar_cache else "n/a",
                    r["peak_mem_mib"],
                ]
                for r in runs
            ],
            title=f"\ntime per sample at equal length L = {L} (batch {B}, {args.source} source for DFM; untrained "
            f"models: cost only)",
        )
    )
    equal_wall_steps = ar_cache["wall_s"] / per_step_s if ar_cache else None
    if ar_cache:
        print(
            f"DFM steps affordable in the AR+cache wall-clock: {equal_wall_steps:.0f} "
            f"(DFM {1e3 * per_step_s:.1f} ms/step at batch {B})"
        )
    print("equal quality: needs trained models; see the methods study (gen_ppl vs wall_s), not this benchmark")
    out = {
        "bench": "ar",
        "quick": q,
        **env,
        "vocab": V,
        "batch": B,
        "seq_len": L,
        "source": args.source,
        "model": args.preset,
        "compile": args.compile,
        "autocast": args.autocast,
        "ar_available": sample_ar is not None,
        "runs": runs,
        "dfm_ms_per_step": rounded(1e3 * per_step_s),
        "dfm_steps_in_ar_cache_time": rounded(equal_wall_steps) if equal_wall_steps else None,
        "equal_quality": "not measured here: needs trained models (methods study)",
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    emit(out)
    return out


if __name__ == "__main__":
    main()
