"""The exact posterior against brute-force enumeration, and the exact model in the sampling loop."""

import itertools

import numpy as np
import pytest
import torch

from fsdfm.data.oracle import HMMSource, MarkovSource, oracle_nll
from fsdfm.oracle_posterior import ExactPosterior, posterior
from fsdfm.paths import make_path
from fsdfm.samplers import sample
from fsdfm.schedulers import make_scheduler

V, L = 3, 5
SOURCES = {
    "markov1": lambda: MarkovSource(V, order=1, support=2, seed=3),
    "markov2": lambda: MarkovSource(V, order=2, support=2, seed=4),
    "markov2_eps": lambda: MarkovSource(V, order=2, support=2, seed=5, epsilon=0.05),
    "hmm": lambda: HMMSource(V, n_states=3, seed=6, emission_support=2, epsilon=0.0),
}


def brute_force(src, x_t: np.ndarray, kappa: float, source: str) -> np.ndarray:
    """p(x_1^i = v | x_t) by summing p_source(x_1) P(x_t | x_1) over all V^L sequences x_1: (L, V)."""
    seqs = np.array(list(itertools.product(range(V), repeat=L)))
    with np.errstate(divide="ignore"):
        logp = src.log_prob(seqs)
    w = np.exp(logp)
    for i in range(L):
        y = x_t[i]
        if source == "mask":
            w = w * (np.where(seqs[:, i] == y, kappa, 0.0) if y < V else (1 - kappa))
        else:
            w = w * (kappa * (seqs[:, i] == y) + (1 - kappa) / V)
    out = np.zeros((L, V))
    for i in range(L):
        out[i] = np.bincount(seqs[:, i], weights=w, minlength=V)
    return out / w.sum()


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_posterior_equals_brute_force(name, source):
    src = SOURCES[name]()
    rng = np.random.default_rng(0)
    x_1 = src.sample(6, L, seed=1)
    for kappa in (1e-4, 0.3, 0.7, 1 - 1e-4):
        keep = rng.random(x_1.shape) < kappa
        noise = np.full_like(x_1, V) if source == "mask" else rng.integers(0, V, x_1.shape)
        x_t = np.where(keep, x_1, noise)
        got = posterior(
            src, torch.from_numpy(x_t), torch.tensor(kappa, dtype=torch.float64), source, torch.float64
        ).probs.numpy()
        for b in range(len(x_t)):
            want = brute_force(src, x_t[b], kappa, source)
            assert np.abs(got[b] - want).max() < 1e-10, (name, source, kappa, b)


def test_posterior_at_t0_is_the_stationary_marginal():
    """With nothing observed (all masks) every position's posterior is the token marginal of pi."""
    src = MarkovSource(8, order=1, support=3, seed=0)
    x_t = torch.full((2, 6), 8)
    p = posterior(src, x_t, torch.tensor(0.0), "mask").probs
    assert torch.allclose(p, torch.from_numpy(src.stationary).expand_as(p), atol=1e-12)


def _path(source: str, vocab: int):
    return make_path(make_scheduler("polynomial", n=1.0), source, vocab)


def test_exact_model_many_steps_reproduces_the_source():
    """Mask source, cumulative-scalar rule, >= 16 L steps: oracle_nll equals the expected NLL within 3 stderr."""
    src = MarkovSource(8, order=1, support=3, seed=2, epsilon=0.01)  # epsilon: a rare same-step pair stays finite
    Ls, n = 8, 512
    model = ExactPosterior(src, _path("mask", 8))
    out = sample(
        model,
        model.path,
        n_samples=n,
        seq_len=Ls,
        n_steps=16 * Ls,
        rule="cumulative_scalar",
        generator=torch.Generator().manual_seed(0),
    )
    per_seq = -src.log_prob(out.tokens.numpy()) / Ls
    expected = src.expected_nll_per_token(Ls).value
    stderr = per_seq.std(ddof=1) / np.sqrt(n)
    assert abs(per_seq.mean() - expected) < 3 * stderr


def test_exact_model_one_step_is_the_product_of_marginals():
    """One step from all-mask draws every position from its marginal: the NLL of independent stationary tokens,
    far above the entropy rate."""
    src = MarkovSource(8, order=1, support=2, seed=2, epsilon=0.01)
    Ls, n = 8, 2048
    model = ExactPosterior(src, _path("mask", 8))
    out = sample(model, model.path, n_samples=n, seq_len=Ls, n_steps=1, generator=torch.Generator().manual_seed(0))
    # independently computed: the same NLL for sequences drawn i.i.d. from the stationary token marginal
    rng = np.random.default_rng(1)
    iid = rng.choice(8, size=(20000, Ls), p=src.stationary)
    want = oracle_nll(iid, src)
    got = oracle_nll(out.tokens.numpy(), src)
    assert abs(got - want) < 0.1 * want
    assert got > src.expected_nll_per_token(Ls).value + 1.0


def test_bench_oracle_posterior_quick():
    """The benchmark's smoke run: one closing JSON line, both sources and dtypes, positive timings (no asserts on
    their values)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_oracle_posterior.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["bench"] == "oracle_posterior" and rec["dit_forward_ms"] > 0
    assert [(r["source"], r["dtype"]) for r in rec["runs"]] == [
        ("mask", "float64"),
        ("mask", "float32"),
        ("uniform", "float64"),
        ("uniform", "float32"),
    ]
    assert all(r["posterior_ms"] > 0 and r["ratio_to_dit_forward"] > 0 for r in rec["runs"])
