"""FLM / FMLM: the decoding-accuracy time change, the flow map and its semigroup target, the samplers and the
objectives, against closed forms and tiny fakes."""

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from fsdfm.flm import (
    ContinuousSampleOutput,
    FLMConfig,
    FLMObjective,
    FLMTime,
    flow_map,
    noisy_state,
    sample_flm,
    state_chunk_size,
)
from fsdfm.fmlm import (
    FMLMConfig,
    FMLMObjective,
    fmlm_student,
    sample_fmlm,
    semigroup_lambda,
    semigroup_target,
    soft_cross_entropy,
)
from fsdfm.model import DiT, ModelConfig
from fsdfm.samplers import SampleOutput
from fsdfm.train import OptimConfig, StepContext, fit

F64 = torch.float64


@pytest.fixture(scope="module")
def time8():
    return FLMTime(8, n_quadrature=120, n_table=2049)


def tiny_dit(V=8, L=6, h_embedding="none", seed=0, randomise=True):
    """A tiny DiT; `randomise` replaces the zero-initialised adaLN / head so the function is not constant."""
    torch.manual_seed(seed)
    model = DiT(
        ModelConfig(vocab_size=V, seq_len=L, hidden=16, cond_dim=16, n_blocks=1, n_heads=2, h_embedding=h_embedding)
    )
    if randomise:
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("head"):
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


# ---- time change tau = alpha(gamma) ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 8, 64, 1000])
def test_q_at_gamma_zero_is_chance_and_alpha_ends_are_exact(K):
    T = FLMTime(K, n_quadrature=200, n_table=257)
    assert T.q(torch.zeros(1, dtype=F64)).item() == pytest.approx(1.0 / K, rel=1e-5)
    assert T.alpha(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [0.0, 1.0]


def test_alpha_for_two_tokens_is_erf():
    # K = 2: q = P(eps_1 + m > eps_2) = Phi(m / sqrt 2), so alpha = 2q - 1 = erf(m / 2), m = gamma / (1 - gamma).
    T = FLMTime(2, n_quadrature=100, n_table=257)
    g = torch.linspace(0.0, 0.95, 40, dtype=F64)
    assert torch.allclose(T.alpha(g), torch.erf(g / (1 - g) / 2), atol=1e-12)


def test_q_matches_adaptive_quadrature_for_large_vocabulary():
    K = 50257
    T = FLMTime(K, n_quadrature=200, n_table=257)
    for gamma in (0.3, 0.6, 0.8):
        m = gamma / (1 - gamma)
        exact = quad(
            lambda z: norm.pdf(z) * math.exp((K - 1) * norm.logcdf(z + m)),
            -30,
            30,
            points=[math.sqrt(2 * math.log(K)) - m],
            limit=400,
        )[0]
        assert T.q(torch.tensor([gamma], dtype=F64)).item() == pytest.approx(exact, rel=1e-3)


def test_alpha_is_monotone(time8):
    a = time8.alpha(torch.linspace(0.0, 1.0, 5001, dtype=F64))
    assert bool((a.diff() >= 0).all())
    assert bool((time8.alpha(torch.linspace(0.0, 0.9, 500, dtype=F64)).diff() > 0).all())
    assert ((a >= 0) & (a <= 1)).all()


def test_inverse_table_round_trips_and_is_exact_at_the_ends(time8):
    g = torch.linspace(0.0, 0.9, 301, dtype=F64)
    assert torch.allclose(time8.gamma_of_tau(time8.alpha(g)), g, atol=1e-5)
    tau = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    assert torch.allclose(time8.alpha(time8.gamma_of_tau(tau)), tau, atol=1e-5)
    assert time8.gamma_of_tau(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [0.0, 1.0]
    assert bool((time8.gamma_of_tau(tau).diff() >= 0).all())


def test_time_keeps_shape_and_dtype_and_rejects_out_of_range(time8):
    tau = torch.rand(3, 4)
    assert time8.gamma_of_tau(tau).shape == (3, 4) and time8.gamma_of_tau(tau).dtype == torch.float32
    with pytest.raises(ValueError, match="tau must lie in"):
        time8.gamma_of_tau(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="vocab_size"):
        FLMTime(1)


# ---- state, flow map, semigroup ------------------------------------------------------------------------------


def test_noisy_state_is_the_interpolation():
    x_1 = torch.tensor([[0, 3, 2], [1, 1, 4]])
    gamma = torch.tensor([0.25, 1.0], dtype=F64)
    got = noisy_state(x_1, gamma, 5, torch.Generator().manual_seed(3))
    eps = torch.randn((2, 3, 5), generator=torch.Generator().manual_seed(3))
    want = (1 - gamma.float())[:, None, None] * eps + gamma.float()[:, None, None] * torch.nn.functional.one_hot(x_1, 5)
    assert torch.allclose(got, want, atol=1e-6)


def test_flow_map_identity_at_s_equals_t_and_denoiser_at_t_one():
    x, d = torch.randn(2, 3, 5, dtype=F64), torch.rand(2, 3, 5, dtype=F64)
    g = torch.tensor([0.0, 0.7], dtype=F64)
    assert torch.equal(flow_map(x, d, g, g), x)
    assert torch.allclose(flow_map(x, d, g, torch.ones(2, dtype=F64)), d, atol=1e-15)


@pytest.mark.parametrize("gammas", [(0.2, 0.55), "tensors"])
def test_flow_map_in_place_and_with_float_gammas_equals_the_formula(gammas):
    x, d = torch.randn(2, 3, 5, dtype=F64), torch.rand(2, 3, 5, dtype=F64)
    gs, gt = (
        (torch.tensor([0.2, 0.4], dtype=F64), torch.tensor([0.55, 0.9], dtype=F64)) if gammas == "tensors" else gammas
    )
    s_, t_ = torch.as_tensor(gs, dtype=F64).reshape(-1, 1, 1), torch.as_tensor(gt, dtype=F64).reshape(-1, 1, 1)
    want = (1 - t_) / (1 - s_) * x + (t_ - s_) / (1 - s_) * d  # the formula, written out
    assert torch.allclose(flow_map(x, d, gs, gt), want, atol=1e-15)
    x_copy = x.clone()
    out = flow_map(x_copy, d, gs, gt, inplace=True)
    assert out.data_ptr() == x_copy.data_ptr() and torch.allclose(out, want, atol=1e-15)
    with pytest.raises(ValueError, match="gamma_s must be < 1"):
        flow_map(x, d, 1.0, 1.0)


def test_semigroup_lambda_endpoints_and_composition_identity():
    s, t = torch.tensor([0.1, 0.0]), torch.tensor([0.8, 1.0])
    assert torch.allclose(semigroup_lambda(s, s, t), torch.zeros(2))
    assert torch.allclose(semigroup_lambda(s, t, t), torch.ones(2))
    # For any D1, D2: X_{u,t}(X_{s,u}(x; D1); D2) = X_{s,t}(x; lambda D1 + (1 - lambda) D2), exactly.
    s, u, t = (
        torch.tensor([0.1, 0.0, 0.3], dtype=F64),
        torch.tensor([0.4, 0.5, 0.35], dtype=F64),
        torch.tensor([0.9, 1.0, 0.6], dtype=F64),
    )
    x, d1, d2 = (torch.randn(3, 4, 6, dtype=F64) for _ in range(3))
    lam = semigroup_lambda(s, u, t)[:, None, None]
    assert torch.allclose(flow_map(flow_map(x, d1, s, u), d2, u, t), flow_map(x, lam * d1 + (1 - lam) * d2, s, t))


def test_semigroup_target_reduces_to_the_direct_map_for_an_exact_denoiser(time8):
    # Single-point data x*: the exact denoiser is D = onehot(x*) for all (x, s, t).
    x_star = torch.tensor([[2, 0, 5, 7]])
    onehot = torch.nn.functional.one_hot(x_star, 8).to(F64).expand(3, 4, 8)
    exact = lambda x, a, b: onehot[: x.shape[0]]  # noqa: E731
    tau_s, tau_u, tau_t = (torch.tensor(v, dtype=F64) for v in ([0.0, 0.2, 0.5], [0.5, 0.3, 0.7], [1.0, 0.6, 0.9]))
    x_s = noisy_state(x_star.expand(3, 4), time8.gamma_of_tau(tau_s), 8, torch.Generator().manual_seed(0), F64)
    assert torch.allclose(semigroup_target(exact, time8, x_s, tau_s, tau_u, tau_t), onehot)
    g = [time8.gamma_of_tau(v) for v in (tau_s, tau_u, tau_t)]
    direct = flow_map(x_s, onehot, g[0], g[2])
    assert torch.allclose(flow_map(flow_map(x_s, onehot, g[0], g[1]), onehot, g[1], g[2]), direct)


# ---- samplers -------------------------------------------------------------------------------------------------


def test_flm_sampler_with_a_constant_denoiser_returns_its_token(time8):
    k = 5
    calls = []

    def always_k(x, tau):
        calls.append(tau.clone())
        return torch.nn.functional.one_hot(torch.full(x.shape[:2], k), 8).float() * 10.0

    out = sample_flm(always_k, time8, n_samples=5, seq_len=6, n_steps=4, seed=1)
    assert isinstance(out, ContinuousSampleOutput) and isinstance(out, SampleOutput)
    assert out.tokens.shape == (5, 6) and bool((out.tokens == k).all())
    assert out.nfe == 4 and len(calls) == 4
    assert torch.allclose(out.time_grid, torch.linspace(0, 1, 5, dtype=F64))
    assert out.gamma_grid[0] == 0.0 and out.gamma_grid[-1] == 1.0 and bool((out.gamma_grid.diff() > 0).all())
    assert out.peak_mem_bytes > 0 and out.peak_mem_kind == "process_rss" and out.chunk_size >= 5


def test_state_chunk_size():
    assert state_chunk_size(4, 8, torch.float32, 4 * 8 * 4 * 3 + 5) == 3
    assert state_chunk_size(4, 8, torch.float64, 4 * 8 * 8) == 1
    with pytest.raises(ValueError, match="max_state_bytes"):
        state_chunk_size(4, 8, torch.float32, 100)


def test_chunked_and_unchunked_sampling_agree(time8):
    teacher = tiny_dit()
    one_sample = 6 * 8 * 8  # L x V x float64
    kw = dict(n_samples=5, seq_len=6, n_steps=3, seed=11, precision=F64)
    whole = sample_flm(teacher, time8, max_state_bytes=100 * one_sample, **kw)
    pieces = sample_flm(teacher, time8, max_state_bytes=2 * one_sample, **kw)
    assert whole.chunk_size == 100 and pieces.chunk_size == 2
    assert torch.equal(whole.tokens, pieces.tokens)
    assert len(set(whole.tokens.flatten().tolist())) > 1  # a real, non-constant function of the noise
    other_seed = sample_flm(teacher, time8, max_state_bytes=2 * one_sample, **{**kw, "seed": 12})
    assert not torch.equal(other_seed.tokens, whole.tokens)
    student = tiny_dit(h_embedding="raw", seed=1)
    a = sample_fmlm(student, time8, max_state_bytes=100 * one_sample, **kw)
    b = sample_fmlm(student, time8, max_state_bytes=one_sample, **kw)
    assert torch.equal(a.tokens, b.tokens) and a.nfe == 3


def test_fmlm_one_jump_is_argmax_of_the_denoiser_from_noise(time8):
    student = tiny_dit(h_embedding="raw", seed=2)
    out = sample_fmlm(student, time8, n_samples=3, seq_len=6, n_steps=1, seed=4, precision=F64)
    # One jump from gamma = 0 to gamma = 1 lands on D_theta(eps, 0, 1): recompute it from the documented noise.
    from fsdfm.flm import sample_noise

    eps = sample_noise(4, 0, 3, 6, 8, F64, torch.device("cpu"))
    want = student(eps, torch.zeros(3), torch.ones(3)).argmax(-1)
    assert out.nfe == 1 and torch.equal(out.tokens, want)


# ---- objectives -----------------------------------------------------------------------------------------------


def test_flm_training_lowers_the_loss():
    V, L = 8, 8
    time = FLMTime(V, n_quadrature=60, n_table=1025)
    data = (torch.arange(64)[:, None] + torch.arange(L)[None]) % V  # cyclic runs: position i = start + i
    model = tiny_dit(V=V, L=L, randomise=False)
    cfg = OptimConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=None, ckpt_every=0, seed=0)
    res = fit(model.train(), FLMObjective(time, FLMConfig()), data, cfg, progress=False)
    assert res.losses[0] == pytest.approx(math.log(V), abs=1e-4)  # zero-initialised head: uniform D
    assert sum(res.losses[-10:]) / 10 < sum(res.losses[:10]) / 10 - 0.3


def test_fmlm_student_starts_equal_to_its_teacher_at_every_t():
    teacher = tiny_dit(seed=3)
    student = fmlm_student(teacher).eval()
    x = torch.randn(2, 6, 8)
    s = torch.tensor([0.2, 0.6])
    for t in (s, torch.tensor([0.9, 1.0])):
        assert torch.allclose(student(x, s, t), teacher(x, s), atol=1e-6)


def test_fmlm_diagonal_loss_at_init_is_the_teacher_entropy(time8):
    teacher = tiny_dit(seed=4)
    student = fmlm_student(teacher)
    obj = FMLMObjective(teacher, time8, FMLMConfig(diagonal_share=1.0, boundary_share=0.0))
    batch = torch.randint(8, (4, 6), generator=torch.Generator().manual_seed(0))
    loss = obj(StepContext(student, None, batch, torch.Generator().manual_seed(7), 0, 1))
    # Recompute with the same draws: tau_s = tau_t ~ U, x_s from the same generator; soft CE(D, D) = H(D).
    g = torch.Generator().manual_seed(7)
    tau = torch.rand(4, generator=g, dtype=F64)
    x_s = noisy_state(batch, time8.gamma_of_tau(tau), 8, g)
    p = torch.softmax(teacher(x_s, tau.float()), -1)
    assert loss.item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)


def test_fmlm_objective_trains_only_the_student(time8):
    teacher = tiny_dit(seed=5)
    student = fmlm_student(teacher).train()
    cfg = FMLMConfig(diagonal_share=0.25, boundary_share=0.25, u_fraction=0.5)
    assert cfg.row_counts(8) == (2, 2, 4)
    batch = torch.randint(8, (8, 6), generator=torch.Generator().manual_seed(1))
    loss = FMLMObjective(teacher, time8, cfg)(StepContext(student, None, batch, torch.Generator().manual_seed(2), 0, 1))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    tau_s, tau_u, tau_t = FMLMObjective(teacher, time8, cfg).times(
        8, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert torch.equal(tau_s[:2], tau_t[:2]) and tau_s[2:4].tolist() == [0, 0] and tau_t[2:4].tolist() == [1, 1]
    assert bool((tau_s[2:] <= tau_u[2:]).all() and (tau_u[2:] <= tau_t[2:]).all() and (tau_t <= 1).all())


def test_soft_cross_entropy_against_one_hot_is_cross_entropy():
    logits, x = torch.randn(2, 3, 5), torch.randint(5, (2, 3))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert soft_cross_entropy(logits, torch.nn.functional.one_hot(x, 5)).item() == pytest.approx(ce.item(), rel=1e-6)


def test_fmlm_config_validation():
    with pytest.raises(ValueError, match="diagonal_share \\+ boundary_share"):
        FMLMConfig(diagonal_share=0.7, boundary_share=0.5)
    with pytest.raises(ValueError, match="u_fraction"):
        FMLMConfig(u_fraction=1.0)
    with pytest.raises(ValueError, match="tau_min"):
        FLMConfig(tau_min=0.5, tau_max=0.5)


def test_fmlm_defaults_are_the_authors(time8):
    """Diagonal share 0.5, boundary share 0.016 and the midpoint u (the FLM authors' values; issue 16)."""
    cfg = FMLMConfig()
    assert (cfg.diagonal_share, cfg.boundary_share, cfg.u_fraction) == (0.5, 0.016, 0.5)
    assert cfg.row_counts(1000) == (500, 16, 484) and cfg.row_counts(64) == (32, 1, 31)
    tau_s, tau_u, tau_t = FMLMObjective(tiny_dit(seed=5), time8, cfg).times(
        64, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert torch.allclose(tau_u[32:], (tau_s[32:] + tau_t[32:]) / 2)  # the midpoint of every off-diagonal row
    assert tau_s[32].item() == 0 and tau_t[32].item() == 1  # the one boundary row
