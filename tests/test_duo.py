"""Duo's duality and DCD's trajectories (fsdfm.duo), with known or independently computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fsdfm.duo import (
    DuoConfig,
    ancestral_step,
    argmax_latent,
    ddim_trajectory,
    kappa_of_snr,
    snr_of_kappa,
    snr_of_kappa_fast,
)


def test_the_transform_has_its_closed_forms_at_two_tokens_and_at_zero_signal():
    # V = 2: P(argmax right) = P(m + e1 > e2) = Phi(m / sqrt 2), so kappa = 2 Phi(m / sqrt 2) - 1
    m = torch.tensor([0.0, 0.3, 1.0, 2.5])
    expected = 2 * stats.norm.cdf(m.numpy() / np.sqrt(2)) - 1
    assert np.allclose(kappa_of_snr(m, 2).numpy(), expected, atol=1e-10)
    assert abs(float(kappa_of_snr(torch.tensor([0.0]), 50))) < 1e-10  # no signal: uniform


@pytest.mark.parametrize("vocab", [5, 40, 50_257])
def test_the_inverse_transform_recovers_kappa(vocab):
    kappa = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999])
    assert torch.allclose(kappa_of_snr(snr_of_kappa(kappa, vocab), vocab), kappa.double(), atol=1e-9)
    # the interpolated table the training objectives use
    assert torch.allclose(kappa_of_snr(snr_of_kappa_fast(kappa, vocab), vocab), kappa.double(), atol=1e-5)


@pytest.mark.parametrize("kappa", [0.15, 0.6])
def test_the_argmax_of_the_gaussian_latent_has_the_uniform_state_marginal(kappa):
    """Chi-square: 40,000 argmax draws at m = T^-1(kappa) against kappa e_{x_1} + (1 - kappa) / V."""
    V, n = 6, 40_000
    g = torch.Generator().manual_seed(1)
    x_1 = torch.full((n, 1), 2)
    eps = torch.randn((n, 1, V), generator=g, dtype=torch.float64)
    x = argmax_latent(x_1, torch.full((n,), kappa, dtype=torch.float64), eps)
    counts = np.bincount(x.flatten().numpy(), minlength=V)
    probs = np.full(V, (1 - kappa) / V)
    probs[2] += kappa
    assert stats.chisquare(counts, probs * n).pvalue > 1e-3
    # and the transform is not vacuous: the uniform marginal is rejected
    assert stats.chisquare(counts, np.full(V, n / V)).pvalue < 1e-6


def test_the_dcd_trajectory_is_a_function_of_the_seed_only():
    x_1 = torch.tensor([[0, 3, 1, 2], [4, 4, 0, 1]])
    kappas = [0.0, 0.3, 0.7, 1.0]
    a = ddim_trajectory(x_1, kappas, 5, torch.Generator().manual_seed(7))
    b = ddim_trajectory(x_1, kappas, 5, torch.Generator().manual_seed(7))
    c = ddim_trajectory(x_1, kappas, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[-1], x_1)  # kappa = 1: the data
    # deterministic along the trajectory: a position right at kappa stays right at every later kappa (the
    # latent's data coordinate only grows with m while the noise is fixed)
    right = a[:-1] == x_1
    assert bool((right[1:] | ~right[:-1]).all())


def test_the_ancestral_step_from_pure_noise_draws_the_denoisers_mixture():
    """kappa_t = 0: q(v) = kappa_s p(v) + (1 - kappa_s) / V whatever x_t is (chi-square over 30,000 draws)."""
    V, n = 4, 30_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).expand(n, 1, V)
    x = torch.zeros((n, 1), dtype=torch.long)
    out = ancestral_step(x, p, 0.0, 0.4, torch.Generator().manual_seed(0))
    counts = np.bincount(out.flatten().numpy(), minlength=V)
    assert stats.chisquare(counts, (0.4 * p[0, 0].numpy() + 0.6 / V) * n).pvalue > 1e-3
    assert torch.equal(ancestral_step(x[:2], p[:2], 0.5, 1.0, None, greedy=True), torch.zeros((2, 1), dtype=torch.long))


def test_the_curriculum_temperature_schedule():
    cfg = DuoConfig(curriculum_start=0.2, curriculum_end=0.6)
    assert cfg.tau(0, 10) == pytest.approx(0.1) and cfg.tau(1, 10) == pytest.approx(0.1)
    assert cfg.tau(4, 10) == pytest.approx(10**-1.5)
    assert cfg.tau(6, 10) is None
    with pytest.raises(ValueError, match="curriculum_start"):
        DuoConfig(curriculum_start=0.7, curriculum_end=0.6)


def test_the_ancestral_step_is_the_posterior_mixture_of_the_exact_conditionals():
    # q(x_s = v | x_t = z) = sum_u p(u) q(x_s = v | x_t = z, x_1 = u), each conditional by Bayes on the uniform-state
    # kernels q(x_s | x_1) = kappa_s 1(. = u) + (1 - kappa_s) / V and q(x_t | x_s) = rho 1(. = x_s) + (1 - rho) / V
    V, kt, ks, z = 4, 0.3, 0.7, 2
    p = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)
    rho = kt / ks
    want = torch.zeros(V, dtype=torch.float64)
    for u in range(V):
        cond = torch.tensor(
            [(rho * (v == z) + (1 - rho) / V) * (ks * (v == u) + (1 - ks) / V) for v in range(V)], dtype=torch.float64
        )
        want += p[u] * cond / cond.sum()
    n = 200_000
    x = torch.full((n, 1), z)
    out = ancestral_step(x, p.expand(n, 1, V), kt, ks, torch.Generator().manual_seed(3))
    counts = torch.bincount(out.flatten(), minlength=V).double()
    chi2 = ((counts - n * want) ** 2 / (n * want)).sum().item()
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_the_ancestral_step_of_an_elbo_x0_is_the_authors_plug_in():
    # posterior=False (released Duo checkpoints): q(v) prop. to [rho 1(v = z) + (1 - rho) / V] [kappa_s x0(v) + (1 - kappa_s) / V]
    V, kt, ks, z = 4, 0.3, 0.7, 2
    x0 = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)
    rho = kt / ks
    want = torch.tensor(
        [(rho * (v == z) + (1 - rho) / V) * (ks * x0[v].item() + (1 - ks) / V) for v in range(V)], dtype=torch.float64
    )
    want = want / want.sum()
    n = 200_000
    out = ancestral_step(
        torch.full((n, 1), z), x0.expand(n, 1, V), kt, ks, torch.Generator().manual_seed(4), posterior=False
    )
    counts = torch.bincount(out.flatten(), minlength=V).double()
    assert ((counts - n * want) ** 2 / (n * want)).sum().item() < 16.27  # chi-square, 3 d.o.f., p = 0.001


def _dense_step(x, p, kappa_t, kappa_s, generator, posterior=True):
    """The step's formula written with the dense one-hot z (the form the module docstring states)."""
    V = p.shape[-1]
    p = p.to(torch.float64)
    z = torch.nn.functional.one_hot(x, V).to(torch.float64)
    if posterior:
        p = p / (kappa_t * z + (1.0 - kappa_t) / V)
        p = p / p.sum(-1, keepdim=True)
    rho = kappa_t / kappa_s
    q = ((1.0 - rho) / V + rho * z) * (kappa_s * p + (1.0 - kappa_s) / V)
    q = q / q.sum(-1, keepdim=True)
    u = torch.rand(q.shape[:-1] + (1,), dtype=torch.float64, generator=generator)
    return torch.searchsorted(q.cumsum(-1), u).squeeze(-1).clamp(max=V - 1)


@pytest.mark.parametrize("posterior", [True, False])
def test_the_sparse_step_equals_the_dense_one_hot_formula_bit_for_bit(posterior):
    """The step corrects one entry per row instead of building one_hot(x): same draws, bit for bit, so the speed-up
    changed no recorded sample."""
    for trial in range(12):
        g = torch.Generator().manual_seed(trial)
        B, L, V = [(3, 5, 7), (16, 9, 33), (8, 4, 2)][trial % 3]
        dtype = (torch.float32, torch.float64)[trial % 2]
        p = torch.softmax(3 * torch.randn(B, L, V, generator=g), -1).to(dtype)
        x = torch.randint(0, V, (B, L), generator=g)
        kt = 0.9 * float(torch.rand(1, generator=g))
        ks = 1.0 if trial % 4 == 0 else kt + (1 - kt) * float(torch.rand(1, generator=g))
        p_before = p.clone()
        fast = ancestral_step(x, p, kt, ks, torch.Generator().manual_seed(7), posterior=posterior)
        assert torch.equal(p, p_before)  # the caller's p is not modified in place
        assert torch.equal(fast, _dense_step(x, p, kt, ks, torch.Generator().manual_seed(7), posterior))
