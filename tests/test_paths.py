"""The mixture path: P(x_t = x_1) = kappa(t) per position, and the sources' vocabulary and movable() rules."""

import math

import pytest
import torch

from fsdfm.paths import SOURCES, MaskSource, MixturePath, UniformSource, make_path
from fsdfm.schedulers import CosineScheduler, PolynomialScheduler

V = 7
B, L = 8, 25_000  # 200k positions per t value


def _tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)


def _x_1(gen):
    return torch.randint(V, (B, L), generator=gen)


@pytest.mark.parametrize(
    "sched", [PolynomialScheduler(1), PolynomialScheduler(2), CosineScheduler()], ids=["poly1", "poly2", "cosine"]
)
def test_mask_path_keeps_data_with_probability_kappa(sched):
    path = MixturePath(sched, MaskSource(V))
    gen = torch.Generator().manual_seed(0)
    x_1 = _x_1(gen)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.95, 1.0], dtype=torch.float64)
    ps = path.sample(x_1, t, gen)
    assert torch.equal(ps.x_1, x_1) and torch.equal(ps.t, t)
    assert bool((ps.x_0 == V).all())
    # every position is either the data token or the mask
    assert bool(((ps.x_t == x_1) | (ps.x_t == V)).all())
    frac = (ps.x_t == x_1).double().mean(1)
    kappa = sched.kappa(t)
    for b in range(B):
        assert abs(float(frac[b] - kappa[b])) <= _tol(float(kappa[b]), L), (b, float(frac[b]), float(kappa[b]))
    assert float(frac[0]) == 0.0 and float(frac[-1]) == 1.0


@pytest.mark.parametrize("sched", [PolynomialScheduler(1), CosineScheduler()], ids=["poly1", "cosine"])
def test_uniform_path_keeps_data_with_probability_kappa(sched):
    path = MixturePath(sched, UniformSource(V))
    gen = torch.Generator().manual_seed(1)
    x_1 = _x_1(gen)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.95, 1.0], dtype=torch.float64)
    ps = path.sample(x_1, t, gen)
    assert bool(((ps.x_t == x_1) | (ps.x_t == ps.x_0)).all())
    kappa = sched.kappa(t)
    # x_0 is uniform over the V data tokens (never a mask id)
    counts = torch.bincount(ps.x_0.flatten(), minlength=V)
    assert counts.numel() == V
    n = ps.x_0.numel()
    assert (counts.double() / n - 1 / V).abs().max() <= _tol(1 / V, n)
    for b in range(B):
        # where the source token differs from the data, x_t = x_1 exactly when the path picked x_1 (prob kappa)
        differ = ps.x_0[b] != x_1[b]
        n_b = int(differ.sum())
        frac = float((ps.x_t[b][differ] == x_1[b][differ]).double().mean())
        assert abs(frac - float(kappa[b])) <= _tol(float(kappa[b]), n_b)
        # overall, chance agreement of x_0 with x_1 adds (1 - kappa) / V
        p_same = float(kappa[b]) + (1 - float(kappa[b])) / V
        frac_all = float((ps.x_t[b] == x_1[b]).double().mean())
        assert abs(frac_all - p_same) <= _tol(p_same, L)


def test_path_sample_is_reproducible_with_a_seed():
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    x_1 = torch.randint(V, (3, 50), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    a = path.sample(x_1, t, torch.Generator().manual_seed(5))
    b = path.sample(x_1, t, torch.Generator().manual_seed(5))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.x_0, b.x_0)


def test_mask_source_vocabulary_and_movable():
    src = MaskSource(V)
    assert src.mask_id == V
    assert src.vocab_size == V and src.input_vocab_size == V + 1
    x0 = src.sample((2, 3))
    assert x0.dtype == torch.long and bool((x0 == V).all())
    x = torch.tensor([[V, 0, V - 1, V]])
    # only masked positions may still move: an unmasked token is final
    assert src.movable(x).tolist() == [[True, False, False, True]]


def test_uniform_source_vocabulary_and_movable():
    src = UniformSource(V)
    assert src.vocab_size == V and src.input_vocab_size == V
    x = torch.tensor([[0, 3, V - 1]])
    assert src.movable(x).tolist() == [[True, True, True]]
    x0 = src.sample((4, 1000), generator=torch.Generator().manual_seed(0))
    assert int(x0.min()) == 0 and int(x0.max()) == V - 1


def test_make_path_and_registry():
    path = make_path(PolynomialScheduler(2), "mask", V)
    assert isinstance(path.source, MaskSource) and path.vocab_size == V
    assert path.describe() == {"scheduler": {"name": "polynomial", "n": 2.0}, "source": "mask", "vocab_size": V}
    assert set(SOURCES.names()) >= {"mask", "uniform"}
    with pytest.raises(KeyError, match="did you mean 'uniform'"):
        make_path(PolynomialScheduler(1), "unifrom", V)
    with pytest.raises(ValueError, match="vocab_size must be >= 2"):
        UniformSource(1)
