"""Known answers for the kappa(t) schedulers: boundary values, derivatives, inverses, rate and its integral."""

import math

import pytest
import torch

from fsdfm.registry import UnknownNameError
from fsdfm.schedulers import SCHEDULERS, CosineScheduler, PolynomialScheduler, make_scheduler

SCHEDS = {
    "poly1": PolynomialScheduler(1.0),
    "poly2": PolynomialScheduler(2.0),
    "poly0.5": PolynomialScheduler(0.5),
    "cosine": CosineScheduler(),
}
# Interior points (the derivative of t^0.5 is infinite at 0, the rate infinite at 1).
T = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDS)
def test_kappa_boundary_values(name):
    sched = SCHEDS[name]
    ends = sched.kappa(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", SCHEDS)
def test_kappa_is_increasing_in_unit_interval(name):
    k = SCHEDS[name].kappa(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert bool((k[1:] > k[:-1]).all())
    assert bool(((k >= 0) & (k <= 1)).all())


def test_closed_forms():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.allclose(PolynomialScheduler(1).kappa(t), t)
    assert torch.allclose(PolynomialScheduler(2).kappa(t), torch.tensor([0.0625, 0.25], dtype=torch.float64))
    # sin^2(pi/8) = (1 - cos(pi/4)) / 2, sin^2(pi/4) = 1/2
    expected = torch.tensor([(1 - math.cos(math.pi / 4)) / 2, 0.5], dtype=torch.float64)
    assert torch.allclose(CosineScheduler().kappa(t), expected)


@pytest.mark.parametrize("name", SCHEDS)
def test_derivative_matches_central_finite_difference(name):
    sched = SCHEDS[name]
    eps = 1e-6
    fd = (sched.kappa(T + eps) - sched.kappa(T - eps)) / (2 * eps)
    assert torch.allclose(sched.d_kappa(T), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDS)
def test_inverse_round_trips(name):
    sched = SCHEDS[name]
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    assert torch.allclose(sched.kappa_inverse(sched.kappa(t)), t, atol=1e-12)
    k = torch.linspace(0, 1, 41, dtype=torch.float64)
    assert torch.allclose(sched.kappa(sched.kappa_inverse(k)), k, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDS)
def test_rate_is_d_kappa_over_one_minus_kappa(name):
    sched = SCHEDS[name]
    out = sched(T)
    assert torch.equal(out.kappa, sched.kappa(T))
    assert torch.equal(out.d_kappa, sched.d_kappa(T))
    assert torch.allclose(out.rate, sched.d_kappa(T) / (1 - sched.kappa(T)), rtol=1e-14)


def test_linear_rate_known_answer():
    # kappa = t: g(t) = 1 / (1 - t)
    t = torch.tensor([0.0, 0.5, 0.75], dtype=torch.float64)
    assert torch.allclose(PolynomialScheduler(1)(t).rate, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))


def _integral_of_rate(sched, t: float, h: float, n: int = 2000) -> float:
    """Composite Simpson's rule for the integral of g over [t, t + h]."""
    s = torch.linspace(t, t + h, 2 * n + 1, dtype=torch.float64)
    g = sched(s).rate
    w = torch.ones_like(s)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((w * g).sum() * (h / (2 * n)) / 3)


@pytest.mark.parametrize("name", SCHEDS)
@pytest.mark.parametrize("t,h", [(0.1, 0.2), (0.05, 0.5), (0.5, 0.25), (0.7, 0.2)])
def test_cumulative_rate_is_integral_of_rate(name, t, h):
    sched = SCHEDS[name]
    tt, hh = torch.tensor([t], dtype=torch.float64), torch.tensor([h], dtype=torch.float64)
    integral = _integral_of_rate(sched, t, h)
    assert float(sched.cumulative_rate(tt, hh)) == pytest.approx(integral, rel=1e-7)
    assert float(sched.survival_ratio(tt, hh)) == pytest.approx(math.exp(-integral), rel=1e-7)


def test_survival_ratio_known_answers():
    lin = PolynomialScheduler(1)
    t = torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64)
    h = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    # (1 - (t + h)) / (1 - t): 0.5, 0.5, 0 (the step reaches t = 1)
    assert torch.allclose(lin.survival_ratio(t, h), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    G = lin.cumulative_rate(t, h)
    assert torch.allclose(G[:2], torch.full((2,), math.log(2.0), dtype=torch.float64))
    assert math.isinf(float(G[2]))


def test_registry_and_validation():
    assert set(SCHEDULERS.names()) >= {"polynomial", "cosine"}
    sched = make_scheduler("polynomial", n=2)
    assert isinstance(sched, PolynomialScheduler) and sched.n == 2.0
    assert sched.describe() == {"name": "polynomial", "n": 2.0}
    with pytest.raises(UnknownNameError, match="did you mean 'cosine'"):
        make_scheduler("cosin")
    with pytest.raises(ValueError, match="exponent n must be > 0"):
        PolynomialScheduler(0)
