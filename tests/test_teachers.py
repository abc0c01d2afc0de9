"""Shortcut teachers: each evaluates the model at the stated (state, t, h) points and combines with the stated weights.

A spy evaluator records (x, t, h) per call and returns known logits (call i returns the constant i); a spy jumper
records its arguments and returns a fresh, recognisable state, so the data flow can be checked exactly. The real
`Jumper` is then checked on a mask source, where every state must be its predecessor with some masks filled.
"""

import math

import pytest
import torch

from fsdfm.paths import MaskSource, MixturePath, UniformSource
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.teachers import COMPOSITIONS, Jumper

V, B, L = 6, 2, 5


class SpyEvaluator:
    """f(x, t, h) -> logits equal to the call number (1, 2, ...) everywhere, or a one-hot on token tokens[i]."""

    def __init__(self, tokens=None):
        self.calls = []
        self.tokens = tokens

    def __call__(self, x, t, h):
        self.calls.append((x.clone(), t.clone(), h.clone()))
        i = len(self.calls)
        if self.tokens is None:
            return torch.full((x.shape[0], x.shape[1], V), float(i))
        out = torch.full((x.shape[0], x.shape[1], V), -1e4)  # softmax of this is exactly one-hot in float64
        out[..., self.tokens[i - 1]] = 0.0
        return out


class SpyJumper:
    """J(x, logits, t, h) -> x + 1000 * (call number): records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, logits, t, h):
        self.calls.append((x.clone(), logits.clone(), t.clone(), h.clone()))
        return x + 1000 * len(self.calls)


def _inputs():
    x_t = torch.arange(B * L).view(B, L)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    h = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return x_t, t, h


def _assert_call(call, x, t, h):
    assert torch.equal(call[0], x) and torch.equal(call[1], t) and torch.equal(call[2], h)


def test_rk4_points_and_weights():
    f, jump = SpyEvaluator(), SpyJumper()
    x_t, t, h = _inputs()
    target = COMPOSITIONS.get("rk4")(f, jump, x_t, t, h)
    hh = h / 2
    # (k1 + 2 k2 + 2 k3 + k4) / 6 with k_i = i
    assert torch.equal(target, torch.full((B, L, V), (1 + 2 * 2 + 2 * 3 + 4) / 6))
    assert len(f.calls) == 4 and len(jump.calls) == 3
    x_a, x_b, x_c = x_t + 1000, x_t + 1000 + 2000, x_t + 1000 + 2000 + 3000  # the states chain
    _assert_call(f.calls[0], x_t, t, hh)
    _assert_call(f.calls[1], x_a, t + hh, hh)
    _assert_call(f.calls[2], x_b, t + hh, hh)
    _assert_call(f.calls[3], x_c, t + h, hh)
    # jumps: x_a = J(x_t, k1, t, h/2); x_b = J(x_a, k2, t + h/2, h/2); x_c = J(x_b, k3, t + h/2, h/2)
    for j, (x_in, k, t_in) in enumerate([(x_t, 1.0, t), (x_a, 2.0, t + hh), (x_b, 3.0, t + hh)]):
        xj, logits, tj, hj = jump.calls[j]
        assert torch.equal(xj, x_in) and bool((logits == k).all())
        assert torch.equal(tj, t_in) and torch.equal(hj, hh)


def test_rk4_time_consistent_points_and_weights():
    f, jump = SpyEvaluator(), SpyJumper()
    x_t, t, h = _inputs()
    target = COMPOSITIONS.get("rk4_time_consistent")(f, jump, x_t, t, h)
    hh = h / 2
    assert torch.equal(target, torch.full((B, L, V), 15 / 6))
    # every state jumps from x_t, by the time it is read at
    _assert_call(f.calls[0], x_t, t, hh)
    _assert_call(f.calls[1], x_t + 1000, t + hh, hh)
    _assert_call(f.calls[2], x_t + 2000, t + hh, hh)
    _assert_call(f.calls[3], x_t + 3000, t + h, hh)
    for j, (k, hj_expected) in enumerate([(1.0, hh), (2.0, hh), (3.0, h)]):
        xj, logits, tj, hj = jump.calls[j]
        assert torch.equal(xj, x_t) and bool((logits == k).all())
        assert torch.equal(tj, t) and torch.equal(hj, hj_expected)


def test_heun_points_and_weights():
    f, jump = SpyEvaluator(), SpyJumper()
    x_t, t, h = _inputs()
    target = COMPOSITIONS.get("heun")(f, jump, x_t, t, h)
    hh = h / 2
    assert torch.equal(target, torch.full((B, L, V), 1.5))  # (k1 + k2) / 2
    assert len(f.calls) == 2 and len(jump.calls) == 1
    _assert_call(f.calls[0], x_t, t, hh)
    _assert_call(f.calls[1], x_t + 1000, t + hh, hh)
    xj, logits, tj, hj = jump.calls[0]
    assert torch.equal(xj, x_t) and bool((logits == 1.0).all()) and torch.equal(tj, t) and torch.equal(hj, hh)


def test_weights_with_non_constant_logits():
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randn(B, L, V, generator=gen) for _ in range(4)]
    calls = iter(ks)
    x_t, t, h = _inputs()
    target = COMPOSITIONS.get("rk4")(lambda x, tt, hh: next(calls), SpyJumper(), x_t, t, h)
    assert torch.allclose(target, (ks[0] + 2 * ks[1] + 2 * ks[2] + ks[3]) / 6, atol=1e-6)


def test_registry():
    assert set(COMPOSITIONS.names()) >= {"rk4", "rk4_x1", "rk4_time_consistent", "heun"}
    assert COMPOSITIONS.get("rk4_x1") is COMPOSITIONS.get(
        "rk4"
    )  # same composition; only the Jumper's last step differs


# ------------------------------------------------------------------------------------------ with the real Jumper

N = 40_000  # positions per row for the statistical checks
MASK = V


def _filled_from(prev: torch.Tensor, new: torch.Tensor, token: int) -> float:
    """Assert `new` is `prev` with some masks replaced by `token`, and return the filled share of prev's masks."""
    masked = prev == MASK
    assert torch.equal(new[~masked], prev[~masked]), "an unmasked token moved"
    changed = new != prev
    assert bool((new[changed] == token).all()), "a mask was filled with a token the evaluator did not predict"
    return float(changed[masked].double().mean())


def _assert_share(observed: float, p: float, n: int):
    assert abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n), (observed, p)


def _masked_x_t(kappa: float, seed: int = 0) -> torch.Tensor:
    """One row: token 4 with probability kappa, else the mask."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(1, N, generator=gen) < kappa, 4, MASK)


def test_rk4_with_real_jumper_chains_states():
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))  # kappa = t: unmask prob (b - a) / (1 - a)
    f = SpyEvaluator(tokens=[0, 1, 2, 3])
    x_t = _masked_x_t(0.25)
    t, h = torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    COMPOSITIONS.get("rk4")(f, Jumper(path, torch.Generator().manual_seed(1)), x_t, t, h)
    states = [c[0] for c in f.calls]
    assert torch.equal(states[0], x_t)
    n_masked = [int((s == MASK).sum()) for s in states]
    # x_a from x_t by k1 (token 0) over [0.25, 0.5]; x_b from x_a by k2 over [0.5, 0.75]; x_c from x_b by k3 over
    # [0.5, 0.75] again (the faithful RK-4: x_b has advanced a full h but k3 is read at t + h/2)
    _assert_share(_filled_from(states[0], states[1], 0), 0.25 / 0.75, n_masked[0])
    _assert_share(_filled_from(states[1], states[2], 1), 0.25 / 0.5, n_masked[1])
    _assert_share(_filled_from(states[2], states[3], 2), 0.25 / 0.5, n_masked[2])


def test_rk4_time_consistent_with_real_jumper_jumps_from_x_t():
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))
    f = SpyEvaluator(tokens=[0, 1, 2, 3])
    x_t = _masked_x_t(0.25)
    n_masked = int((x_t == MASK).sum())
    t, h = torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    COMPOSITIONS.get("rk4_time_consistent")(f, Jumper(path, torch.Generator().manual_seed(2)), x_t, t, h)
    states = [c[0] for c in f.calls]
    _assert_share(_filled_from(x_t, states[1], 0), 0.25 / 0.75, n_masked)  # [0.25, 0.5]
    _assert_share(_filled_from(x_t, states[2], 1), 0.25 / 0.75, n_masked)  # [0.25, 0.5]
    _assert_share(_filled_from(x_t, states[3], 2), 0.5 / 0.75, n_masked)  # [0.25, 0.75]


@pytest.mark.parametrize("x1_at_end", [False, True])
def test_jumper_fills_every_mask_when_the_step_reaches_one(x1_at_end):
    """Mask source: the forced jump and the x_1 draw agree (a mask has p(z) = 0; unmasked tokens are frozen)."""
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))
    x = _masked_x_t(0.5).expand(2, N).clone()
    logits = torch.zeros(2, N, V)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    h = torch.tensor([0.5, 0.25], dtype=torch.float64)
    y = Jumper(path, torch.Generator().manual_seed(3), x1_at_end=x1_at_end)(x, logits, t, h)
    assert torch.equal(y[x != MASK], x[x != MASK])
    assert bool((y[0] != MASK).all())  # row 0 reaches t = 1: every mask is filled
    masked = x[1] == MASK
    _assert_share(float((y[1][masked] != MASK).double().mean()), 0.25 / 0.75, int(masked.sum()))
    # destinations ~ p = uniform over the V data tokens
    filled = y[0][x[0] == MASK]
    counts = torch.bincount(filled, minlength=V).double() / filled.numel()
    for v in range(V):
        _assert_share(float(counts[v]), 1 / V, filled.numel())


def test_jumper_on_uniform_source_uses_the_cumulative_rule():
    path = MixturePath(PolynomialScheduler(2), UniformSource(V))
    x = torch.full((1, N), 1)
    logits = torch.log(torch.tensor([0.1, 0.3, 0.1, 0.2, 0.2, 0.1]))[None, None].expand(1, N, V)
    t, h = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    y = Jumper(path, torch.Generator().manual_seed(4))(x, logits, t, h)
    r = (1 - 0.75**2) / (1 - 0.5**2)
    _assert_share(float((y != x).double().mean()), 1 - r ** (1 - 0.3), N)


def test_jumper_at_t_plus_h_one_on_uniform_source_forces_a_jump_or_draws_x1():
    """r = 0 at t + h = 1: the official rule moves every token with p(z) < 1, to x != z with probability
    p(x) / (1 - p(z)); rk4_x1's Jumper draws x_1 ~ p, keeping z with probability p(z) = 0.3."""
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    probs = torch.tensor([0.1, 0.3, 0.1, 0.2, 0.2, 0.1], dtype=torch.float64)
    x = torch.full((1, N), 1)
    logits = torch.log(probs)[None, None].expand(1, N, V)
    t, h = torch.tensor([0.75], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    forced = Jumper(path, torch.Generator().manual_seed(5))(x, logits, t, h)
    assert bool((forced != 1).all())
    counts = torch.bincount(forced[0], minlength=V).double() / N
    for v in (0, 2, 3, 4, 5):
        _assert_share(float(counts[v]), float(probs[v] / 0.7), N)
    drawn = Jumper(path, torch.Generator().manual_seed(5), x1_at_end=True)(x, logits, t, h)
    counts = torch.bincount(drawn[0], minlength=V).double() / N
    for v in range(V):
        _assert_share(float(counts[v]), float(probs[v]), N)
