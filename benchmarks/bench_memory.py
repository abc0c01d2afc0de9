"""Benchmark: peak memory of FLM's chunked continuous sampling (`fsdfm.flm.sample_flm`) against its state budget
`max_state_bytes`, with a randomly initialised `tiny` DiT reading the (B, L, V) float state (V = 2048 by default).

FLM's state is B x L x V floats, so `sample_continuous` samples `state_chunk_size(L, V, dtype, max_state_bytes)`
sequences at a time. For each budget the benchmark records the chunk size, the largest state the network was
actually handed (a wrapper measures every call's input, bytes = chunk x L x V x 4) -- which must not exceed the
budget -- the process peak RSS of the sampling calls (and its increase over the RSS before the first sampling call), the peak
the sampler itself reports, and the wall-clock. Noise is drawn per sample, so the tokens must not depend on the
chunking: the benchmark checks that every budget returns the same tokens. Prints a table, then one JSON line.

    python benchmarks/bench_memory.py [--quick] [--threads 1] [--n 64] [--len 128] [--steps 4]
                                      [--budgets-mib 1,4,16,64] [--compile]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from benchlib import MiB, add_common_args, emit, environment, maybe_compile, measure, random_dit, rounded, setup, table
from fsdfm.flm import FLMTime, sample_flm, state_chunk_size
from fsdfm.memory import _vm_hwm_bytes


class StateProbe(nn.Module):
    """`model` that records the largest input state (bytes) and the largest logits (bytes) it saw."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.max_state_bytes = self.max_logits_bytes = self.calls = 0

    def forward(self, x, *args, **kwargs):
        out = self.model(x, *args, **kwargs)
        self.calls += 1
        self.max_state_bytes = max(self.max_state_bytes, x.numel() * x.element_size())
        self.max_logits_bytes = max(self.max_logits_bytes, out.numel() * out.element_size())
        return out


def current_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--vocab", type=int, default=None, help="V (default 2048; --quick: 256)")
    parser.add_argument("--n", type=int, default=None, help="samples")
    parser.add_argument("--len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--budgets-mib", default=None, help="comma-separated max_state_bytes in MiB")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    device = setup(args)
    q = args.quick
    V, N, L = args.vocab or (256 if q else 2048), args.n or (16 if q else 64), args.len or (32 if q else 128)
    steps, repeats = args.steps or (2 if q else 4), args.repeats or (1 if q else 3)
    per_sample = L * V * 4  # float32 state
    budgets = (
        [float(b) for b in args.budgets_mib.split(",")]
        if args.budgets_mib
        else [per_sample * k / MiB for k in ((1, 4, 16) if q else (1, 4, 16, 64))]
    )
    budgets = [int(b * MiB) for b in budgets]
    env = environment(device)
    print(
        f"bench_memory: FLM chunked sampling, {args.preset} DiT (random init), V {V}, {N} samples x L {L}, {steps} steps; "
        f"one sample's state {per_sample / MiB:.2f} MiB, all {N}: {N * per_sample / MiB:.1f} MiB; {env['device']}, "
        f"{env['threads']} threads, load average {env['loadavg_1min']}"
    )
    model = maybe_compile(random_dit(V, L, preset=args.preset, seed=args.seed, device=device), args.compile)
    time_change = FLMTime(V)
    runs, rows, tokens = [], [], None
    rss_start = current_rss()  # budgets run in increasing order, so memory kept from a smaller one is never the peak
    for budget in sorted(budgets):
        probe = StateProbe(model)

        def run(budget=budget, probe=probe):
            return sample_flm(
                probe,
                time_change,
                n_samples=N,
                seq_len=L,
                n_steps=steps,
                seed=args.seed,
                max_state_bytes=budget,
                device=device,
            )

        run()  # warm-up at this chunk size
        m = measure(run, repeats=repeats, warmup=0, device=device)
        out = m.result
        chunk = state_chunk_size(L, V, torch.float32, budget)
        same = tokens is None or torch.equal(out.tokens, tokens)
        tokens = out.tokens if tokens is None else tokens
        rec = {
            "max_state_bytes": budget,
            "chunk_size": out.chunk_size,
            "expected_chunk_size": min(chunk, N),
            "max_state_seen_bytes": probe.max_state_bytes,
            "max_logits_seen_bytes": probe.max_logits_bytes,
            "state_within_budget": probe.max_state_bytes <= budget,
            "nfe": out.nfe,
            "calls_per_run": probe.calls // (repeats + 1),
            "wall_s": rounded(m.wall_s),
            "peak_mem_mib": rounded(m.peak_mem_bytes / MiB),
            "peak_mem_kind": m.peak_mem_kind,
            "peak_over_start_mib": rounded(max(0, m.peak_mem_bytes - rss_start) / MiB)
            if device.type == "cpu"
            else None,
            "sampler_peak_mem_mib": rounded(out.peak_mem_bytes / MiB),
            "tokens_same_as_first_budget": same,
        }
        runs.append(rec)
        rows.append(
            [
                budget / MiB,
                out.chunk_size,
                probe.max_state_bytes / MiB,
                probe.max_logits_bytes / MiB,
                rec["state_within_budget"],
                m.wall_s,
                rec["peak_mem_mib"],
                rec["peak_over_start_mib"],
                same,
            ]
        )
        print(f"  budget {budget / MiB:.1f} MiB: chunk {out.chunk_size}, peak {rec['peak_mem_mib']} MiB", flush=True)
    print(
        table(
            [
                "budget MiB",
                "chunk",
                "max state seen MiB",
                "max logits MiB",
                "state <= budget",
                "wall s",
                "peak RSS MiB",
                "peak - start MiB",
                "same tokens",
            ],
            rows,
            title=f"\nFLM sampling peak memory vs max_state_bytes (process peak RSS of the timed calls; medians of "
            f"{repeats} for the wall-clock)",
        )
    )
    record = {
        "bench": "memory",
        "quick": q,
        **env,
        "vocab": V,
        "n_samples": N,
        "seq_len": L,
        "steps": steps,
        "model": args.preset,
        "compile": args.compile,
        "state_bytes_per_sample": per_sample,
        "state_bytes_all_samples": N * per_sample,
        "runs": runs,
        "all_within_budget": all(r["state_within_budget"] for r in runs),
        "tokens_independent_of_chunking": all(r["tokens_same_as_first_budget"] for r in runs),
        "vm_hwm_available": _vm_hwm_bytes() is not None,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
