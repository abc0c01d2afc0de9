"""The exact joint sampler (FFBS of x_1 | x_t, then the path's bridge): an exact draw from the source at any budget."""

import itertools
import math

import numpy as np
import pytest
import torch

from fsdfm.data.oracle import HMMSource, MarkovSource
from fsdfm.oracle_joint import joint_posterior_sample, sample_joint
from fsdfm.paths import make_path
from fsdfm.samplers import time_grid
from fsdfm.schedulers import make_scheduler

SOURCES = {
    "markov1": lambda: MarkovSource(6, order=1, support=2, seed=3, epsilon=0.01),
    "markov2": lambda: MarkovSource(4, order=2, support=2, seed=4),
    "hmm": lambda: HMMSource(6, n_states=3, seed=6, emission_support=2, epsilon=0.0),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("steps", [1, 2, 8])
def test_joint_sampler_oracle_nll_is_within_3_se_of_h_l(name, source, steps):
    src, L, n = SOURCES[name](), 12, 3000
    path = make_path(make_scheduler("polynomial", n=2), source, src.vocab_size)
    g = torch.Generator().manual_seed(steps)
    out = sample_joint(src, path, n_samples=n, seq_len=L, grid=time_grid(steps), generator=g, batch_size=1000)
    assert out.nfe == steps and out.tokens.shape == (n, L)
    nll = -src.log_prob(out.tokens.numpy()) / L  # per-sample oracle NLL per token
    se = nll.std(ddof=1) / math.sqrt(n)
    h_l = float(src.expected_nll_per_token(L))
    h_se = getattr(src.expected_nll_per_token(L), "stderr", 0.0)  # the HMM's H_L is itself a Monte-Carlo estimate
    assert abs(nll.mean() - h_l) < 3 * math.sqrt(se**2 + h_se**2), (nll.mean(), h_l, se)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_ffbs_draws_follow_the_brute_force_posterior(source):
    # V^L = 3^4 sequences: the empirical law of 20,000 joint draws given one x_t against p(x_1 | x_t) enumerated
    src, V, L, kappa = MarkovSource(3, order=2, support=2, seed=5, epsilon=0.05), 3, 4, 0.4
    x_t = torch.tensor([[V, 1, V, 0]]) if source == "mask" else torch.tensor([[2, 1, 0, 0]])
    seqs = np.array(list(itertools.product(range(V), repeat=L)))
    w = np.exp(src.log_prob(seqs))
    for i in range(L):
        y = int(x_t[0, i])
        if source == "mask":
            w = w * (1.0 if y == V else (seqs[:, i] == y))
        else:
            w = w * (kappa * (seqs[:, i] == y) + (1 - kappa) / V)
    want = w / w.sum()
    n = 20000
    draws = joint_posterior_sample(
        src, x_t.expand(n, L), torch.tensor(kappa), source, torch.Generator().manual_seed(0)
    ).numpy()
    idx = (draws * V ** np.arange(L - 1, -1, -1)).sum(1)
    got = np.bincount(idx, minlength=V**L) / n
    # chi-square goodness of fit over the cells the posterior allows (every draw lands in one of them)
    assert got[want == 0].sum() == 0
    ok = want > 0
    chi2 = float((n * (got[ok] - want[ok]) ** 2 / want[ok]).sum())
    from scipy.stats import chi2 as chi2_dist

    assert chi2_dist.sf(chi2, ok.sum() - 1) > 1e-3, chi2
