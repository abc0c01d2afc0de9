"""Benchmark: the sampler's own work per step (everything `fsdfm.samplers.sample` does besides the model forward),
with the default step (which takes the certified float32-exp chunk from 2^19 candidate weights) and with the
float64 chunk throughout, interleaved, and the forward it is compared with.

A stand-in model returns precomputed logits of the `tiny` DiT (random init; its cost is ~0), so the loop time is the
sampler's own work o(n) per step at a budget of n steps; the real forward time F is measured beside it. The stand-in
keeps the sampler's data in cache between steps, which the real forward evicts (issue 28 found the stand-in 2-8x
low), so the few-step budget is also run with the real model between steps (`CpuTimedForward`): own work =
(the run's CPU time - its forwards' CPU time) / steps, and its outside-forward share measured, not derived. Both are
process CPU times (a loaded machine stalls wall time, not CPU time), repeated and interleaved (certified, float64,
default, ...), reported as medians and minima. From them, for each rule and source:

    fraction of the NFE ratio   (F + o(many)) / (F + o(few))     speed-up of few over many steps / (many / few)
    outside-forward share       o(few) / (F + o(few))

are *derived* (not an end-to-end run: `bench_sampling.py --sections sweep` measures those). Prints a table, then
one JSON line.

    python benchmarks/bench_own_work.py [--quick] [--threads 1] [--rules ...] [--sources mask,uniform]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchlib import add_common_args, emit, environment, random_dit, rounded, setup, table
from fsdfm.paths import make_path
from fsdfm.samplers import UPDATE_ALIASES, UPDATE_RULES, sample
from fsdfm.schedulers import PolynomialScheduler


class Precomputed(torch.nn.Module):
    """Stand-in for the model: the same precomputed logits at every call."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x, t, h=None):
        return self.logits


class CpuTimedForward(torch.nn.Module):
    """The real model, with the process CPU time spent inside its forward calls summed in `seconds`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module, self.seconds = model, 0.0

    def forward(self, x, t, h=None):
        c0 = time.process_time()
        out = self.module(x, t, h)
        self.seconds += time.process_time() - c0
        return out


def cpu_seconds(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--vocab", type=int, default=None, help="V (default 2048; --quick: 256)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (--quick: 4)")
    parser.add_argument("--len", type=int, default=None, help="default 64 (--quick: 32)")
    parser.add_argument("--rules", default=",".join([*UPDATE_RULES.names(), *UPDATE_ALIASES]))
    parser.add_argument("--sources", default="mask,uniform")
    parser.add_argument("--budgets", default=None, help="few,many (default 8,1024; --quick: 8,32)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved pairs at the few-step budget "
        "(default 15; --quick: 2); the many-step budget gets a third of them (at least 1)",
    )
    args = parser.parse_args(argv)
    device = setup(args)
    q = args.quick
    V, B, L = args.vocab or (256 if q else 2048), args.batch or (4 if q else 16), args.len or (32 if q else 64)
    few, many = (int(b) for b in (args.budgets or ("8,32" if q else "8,1024")).split(","))
    repeats = args.repeats or (2 if q else 15)
    env = environment(device)
    print(
        f"bench_own_work: tiny DiT (random init), V {V}, batch {B}, L {L}; {env['threads']} threads, load average "
        f"{env['loadavg_1min']} on {env['cpu_count']} CPUs; budgets {few} and {many}; process CPU time"
    )
    model = random_dit(V, L, preset=args.preset, seed=args.seed, device=device)
    results, rows = [], []
    for source in [s for s in args.sources.split(",") if s]:
        path = make_path(PolynomialScheduler(1), source, V)
        x = path.source.sample((B, L), generator=torch.Generator(device).manual_seed(0), device=device)
        t = torch.full((B,), 0.5, device=device)
        with torch.no_grad():
            logits = model(x, t)
            forward = [cpu_seconds(lambda: model(x, t)) for _ in range(max(3, repeats))]
        standin = Precomputed(logits)
        for rule in [r for r in args.rules.split(",") if r]:
            own = {}
            real = []  # (own work per step, outside share) with the real model between the steps, few steps
            for r in range(max(1, repeats // 3)):
                timed = CpuTimedForward(model)
                gen = torch.Generator(device).manual_seed(args.seed + r)
                total = cpu_seconds(
                    lambda timed=timed, gen=gen: sample(
                        timed, path, n_samples=B, seq_len=L, n_steps=few, rule=rule, generator=gen, device=device
                    )
                )
                real.append(((total - timed.seconds) / few, (total - timed.seconds) / total))
            for n in (few, many):
                times = {None: [], False: []}
                for r in range(repeats if n == few else max(1, repeats // 3)):
                    tokens = {}
                    for certified in (None, False):
                        gen = torch.Generator(device).manual_seed(args.seed + r)

                        def run(certified=certified, gen=gen):  # bound now: called at once, but say so
                            tokens[certified] = sample(
                                standin,
                                path,
                                n_samples=B,
                                seq_len=L,
                                n_steps=n,
                                rule=rule,
                                generator=gen,
                                device=device,
                                certified=certified,
                            ).tokens

                        times[certified].append(cpu_seconds(run) / n)
                    if not torch.equal(tokens[None], tokens[False]):
                        raise RuntimeError(f"{source}/{rule}/{n} steps: the default step changed the tokens")
                own[n] = {c: (statistics.median(v), min(v)) for c, v in times.items()}
            F = statistics.median(forward)
            entry = {
                "source": source,
                "rule": rule,
                "forward_ms": rounded(1e3 * F),
                "forward_min_ms": rounded(1e3 * min(forward)),
                "same_tokens": True,
            }
            entry["real_model"] = {
                f"own_ms_per_step_{few}": rounded(1e3 * statistics.median(o for o, _ in real)),
                f"outside_share_{few}": rounded(statistics.median(s for _, s in real)),
                "runs": len(real),
            }
            for certified, name in ((None, "default"), (False, "float64")):
                o_few, o_many = own[few][certified][0], own[many][certified][0]
                entry[name] = {
                    f"own_ms_per_step_{few}": rounded(1e3 * o_few),
                    f"own_ms_per_step_{many}": rounded(1e3 * o_many),
                    f"own_min_ms_per_step_{few}": rounded(1e3 * own[few][certified][1]),
                    "fraction_of_nfe_ratio": rounded((F + o_many) / (F + o_few)),
                    "outside_share_few": rounded(o_few / (F + o_few)),
                }
                rows.append(
                    [
                        source,
                        rule,
                        name,
                        1e3 * F,
                        1e3 * o_few,
                        1e3 * o_many,
                        (F + o_many) / (F + o_few),
                        o_few / (F + o_few),
                        *(
                            (entry["real_model"][f"own_ms_per_step_{few}"], entry["real_model"][f"outside_share_{few}"])
                            if name == "default"
                            else ("", "")
                        ),
                    ]
                )
            results.append(entry)
            print(
                f"  {source} {rule}: own work {1e3 * own[few][None][0]:.2f} vs {1e3 * own[few][False][0]:.2f} "
                f"ms/step (default vs float64 chunk, {few} steps; stand-in), "
                f"{entry['real_model'][f'own_ms_per_step_{few}']:.2f} with the real model",
                flush=True,
            )
    print(
        table(
            [
                "source",
                "rule",
                "chunk",
                "forward ms",
                f"own ms/step {few}",
                f"own ms/step {many}",
                "fraction of NFE ratio (derived)",
                f"outside share {few} (derived)",
                f"own ms/step {few}, real model",
                f"outside share {few}, real model",
            ],
            rows,
            title="\nthe sampler's own work per step (medians of process CPU time; targets >= 0.95 and <= 0.05)",
        )
    )
    record = {
        "bench": "own_work",
        "quick": q,
        **env,
        "vocab": V,
        "batch": B,
        "seq_len": L,
        "few_steps": few,
        "many_steps": many,
        "repeats": repeats,
        "derived": True,
        "results": results,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
