"""Exact output laws of few-step samplers (fsdfm.oracle_law) against brute-force enumeration of trajectories and
against the sampling loop itself; the per-step chain-rule split."""

import itertools
import math

import numpy as np
import pytest
import torch

from fsdfm.data.oracle import MarkovSource
from fsdfm.oracle_law import divergences, output_law, step_split
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import make_path
from fsdfm.samplers import sample, time_grid
from fsdfm.schedulers import make_scheduler


def _setup(source: str, V: int = 2, order: int = 1, seed: int = 3):
    src = MarkovSource(V, order=order, support=2, seed=seed, epsilon=0.1)
    path = make_path(make_scheduler("polynomial", n=2), source, V)
    return src, path, ExactPosterior(src, path)


def _brute_force_law(exact, path, V, L, grid, rule):
    """Sum over every trajectory x^(1..N) of prod_steps prod_positions k(y | x), the kernel written out per
    position with scalar formulas (not fsdfm.oracle_law's code)."""
    A = V + 1 if path.source.name == "mask" else V
    states = list(itertools.product(range(A), repeat=L))
    start = [tuple([V] * L)] if path.source.name == "mask" else states
    n = len(grid) - 1
    law = {}

    def kern(x, y, t, h, final):
        p = exact.probs(torch.tensor([x]), torch.tensor([t])).numpy()[0]  # (L, V)
        k1 = float(path.scheduler.kappa(torch.tensor(t, dtype=torch.float64)))
        k2 = float(path.scheduler.kappa(torch.tensor(t + h, dtype=torch.float64)))
        out = 1.0
        for i in range(L):
            movable = x[i] == V or path.source.name == "uniform"
            if not movable:
                out *= float(y[i] == x[i])
                continue
            if final:
                out *= p[i][y[i]] if y[i] < V else 0.0
                continue
            pz = p[i][x[i]] if x[i] < V else 0.0
            if rule == "cumulative_scalar":
                j = 1 - ((1 - k2) / (1 - k1)) ** (1 - pz)
            else:  # euler: (1 - p(z)) (1 - exp(-h g(t))), g = kappa' / (1 - kappa), kappa = t^2
                j = (1 - pz) * (1 - math.exp(-h * 2 * t / (1 - t**2)))
            if y[i] == x[i]:
                out *= 1 - j
            elif y[i] < V:
                out *= j * p[i][y[i]] / (1 - pz)
            else:
                out = 0.0
        return out

    for x0 in start:
        w0 = 1.0 / len(start)
        for traj in itertools.product(states, repeat=n):
            w, x = w0, x0
            for s, y in enumerate(traj):
                t, h = float(grid[s]), float(grid[s + 1] - grid[s])
                w *= kern(x, y, t, h, s == n - 1)
                if w == 0:
                    break
                x = y
            if w:
                law[traj[-1]] = law.get(traj[-1], 0.0) + w
    return law


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("rule", ["cumulative_scalar", "euler"])
def test_output_law_equals_brute_force_trajectory_enumeration(source, rule):
    V, L = 2, 2
    src, path, exact = _setup(source, V)
    grid = time_grid(3, t_end=0.999)
    law = output_law(exact, path, L, grid, rule)
    want = _brute_force_law(exact, path, V, L, grid, rule)
    got = {tuple(s.tolist()): float(p) for s, p in zip(law.states, law.probs)}
    assert abs(sum(got.values()) - 1.0) < 1e-12
    for s in got:
        assert got[s] == pytest.approx(want.get(s, 0.0), abs=1e-12), s


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_output_law_is_the_law_of_the_sampling_loop(source):
    # 20,000 draws of the real sampler (fsdfm.samplers.sample) against the exact law: chi-square goodness of fit
    V, L, n = 3, 3, 20000
    src, path, exact = _setup(source, V, order=2, seed=4)
    grid = time_grid(2)
    law = output_law(exact, path, L, grid, "cumulative_scalar")
    out = sample(exact, path, n_samples=n, seq_len=L, grid=grid, generator=torch.Generator().manual_seed(1))
    idx = (out.tokens.numpy() * V ** np.arange(L - 1, -1, -1)).sum(1)
    counts = np.bincount(idx, minlength=V**L)
    q = law.probs.numpy()
    from scipy.stats import chi2

    ok = q > 1e-9
    assert counts[~ok].sum() == 0
    stat = float(((counts[ok] - n * q[ok]) ** 2 / (n * q[ok])).sum())
    assert chi2.sf(stat, ok.sum() - 1) > 1e-3, stat


def test_divergences_one_position_has_no_factorization_error_and_ce_is_h_plus_kl():
    # L = 1: the exact denoiser's one-step product sampler draws x_1 ~ p exactly, KL = 0 both ways
    src, path, exact = _setup("mask", V=3, seed=2)
    d1 = divergences(output_law(exact, path, 1, time_grid(1), "cumulative_scalar"), src)
    assert abs(d1.kl_qp) < 1e-12 and abs(d1.kl_pq) < 1e-12 and d1.entropy_q == pytest.approx(d1.entropy_p)
    # L = 4, 2 steps: positions drawn independently within a step lose the chain's dependence (KL > 0), and the
    # cross-entropy (oracle_nll's mean) is exactly H(q) + KL(q || p)
    d = divergences(output_law(exact, path, 4, time_grid(2), "cumulative_scalar"), src)
    assert d.kl_qp > 1e-3 and d.kl_pq > 1e-3
    assert d.cross_entropy == pytest.approx(d.entropy_q + d.kl_qp, abs=1e-12)
    assert d.entropy_p == pytest.approx(float(src.expected_nll_per_token(4)), abs=1e-9)


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("rule", ["cumulative_scalar", "euler"])
def test_chain_rule_split_sums_to_the_path_kl(source, rule):
    V, L = 3, 3
    src, path, exact = _setup(source, V, order=1, seed=7)
    x_1 = torch.from_numpy(src.sample(4, L, seed=0))
    # times exact in float32 (the model is told t in float32, as by the sampling loop)
    for t, h in ((0.0, 0.5), (0.25, 0.125), (0.5, 0.5)):
        x_t = path.sample(x_1, torch.full((4,), t), torch.Generator().manual_seed(2)).x_t
        for x in x_t:
            s = step_split(exact, src, path, x, t, h, rule)
            assert s.path_kl == pytest.approx(s.tc + s.per_position.sum(), abs=1e-10)
            assert s.tc >= -1e-12 and (s.per_position >= -1e-12).all()
            if source == "mask" and rule == "cumulative_scalar":
                # the exact posterior with the cumulative-scalar rule reproduces the bridge's marginals:
                # under the mask source all its error is factorization
                assert s.per_position.max() < 1e-10
