"""Cross-entropy, generalized KL and distillation KL against hand computations on tiny examples."""

import math

import pytest
import torch

from fsdfm.losses import (
    DFM_LOSSES,
    cross_entropy,
    distill_kl,
    distill_kl_per_position,
    generalized_kl,
    generalized_kl_per_position,
)
from fsdfm.paths import PathSample

# Two positions, three tokens: the model's probabilities p_{1|t}(. | x_t) per position.
P = [[1 / 6, 2 / 6, 3 / 6], [0.5, 0.25, 0.25]]


def _logits(probs, shift=0.0):
    """Logits whose softmax is `probs` (a constant shift per row must not matter). -> (1, L, V)."""
    return (torch.tensor(probs, dtype=torch.float64).log() + shift)[None].float()


def test_cross_entropy_hand_computation():
    x_1 = torch.tensor([[2, 0]])
    expected = (-math.log(3 / 6) - math.log(0.5)) / 2
    assert float(cross_entropy(_logits(P, shift=3.0), x_1)) == pytest.approx(expected, rel=1e-6)
    # the weight selects positions: only the second counts
    weight = torch.tensor([[False, True]])
    assert float(cross_entropy(_logits(P), x_1, weight)) == pytest.approx(-math.log(0.5), rel=1e-6)
    # an all-zero weight gives 0, not NaN
    assert float(cross_entropy(_logits(P), x_1, torch.zeros(1, 2, dtype=torch.bool))) == 0.0


def test_generalized_kl_hand_computation_uniform_source():
    # position 0: x_t = x_1 = 2; position 1: x_t = 1 != x_1 = 0; rate g = 2
    x_1, x_t, g = torch.tensor([[2, 0]]), torch.tensor([[2, 1]]), 2.0
    # -g [p(x_t) - 1{x_t = x_1} + (1 - 1{x_t = x_1}) log p(x_1)]
    pos0 = -g * (P[0][2] - 1.0)  # = 1.0
    pos1 = -g * (P[1][1] - 0.0 + math.log(P[1][0]))  # = -0.5 + 2 ln 2
    per_pos = generalized_kl_per_position(_logits(P), x_1, x_t, torch.tensor([g]))
    assert per_pos.shape == (1, 2)
    assert per_pos[0].tolist() == pytest.approx([pos0, pos1], rel=1e-6)
    assert pos0 == pytest.approx(1.0) and pos1 == pytest.approx(-0.5 + 2 * math.log(2))
    assert float(generalized_kl(_logits(P), x_1, x_t, torch.tensor([g]))) == pytest.approx((pos0 + pos1) / 2, rel=1e-6)
    assert float(generalized_kl(_logits(P), x_1, x_t, torch.tensor([g]), torch.tensor([[1, 0]]))) == pytest.approx(
        pos0, rel=1e-6
    )


def test_generalized_kl_hand_computation_mask_token():
    # V = 3, mask id 3: p(mask) = 0, so a masked position contributes -g log p(x_1)
    x_1, x_t, g = torch.tensor([[0, 2]]), torch.tensor([[3, 2]]), 0.5
    pos0 = -g * (0.0 - 0.0 + math.log(P[0][0]))  # = 0.5 ln 6
    pos1 = -g * (P[1][2] - 1.0)  # = 0.375
    per_pos = generalized_kl_per_position(_logits(P), x_1, x_t, torch.tensor([g]))
    assert per_pos[0].tolist() == pytest.approx([pos0, pos1], rel=1e-6)


def test_generalized_kl_rate_is_per_row():
    logits = _logits(P).expand(2, 2, 3)
    x_1, x_t = torch.tensor([[2, 0], [2, 0]]), torch.tensor([[2, 1], [2, 1]])
    per_pos = generalized_kl_per_position(logits, x_1, x_t, torch.tensor([1.0, 3.0]))
    assert torch.allclose(per_pos[1], 3 * per_pos[0])


def test_generalized_kl_is_minimised_by_the_data_token():
    # a confident correct prediction at a noisy position scores lower than a wrong one
    x_1, x_t, g = torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([1.0])
    right = torch.tensor([[[10.0, 0.0, 0.0]]])
    wrong = torch.tensor([[[0.0, 10.0, 0.0]]])
    assert float(generalized_kl(right, x_1, x_t, g)) < float(generalized_kl(wrong, x_1, x_t, g))


def test_distill_kl_hand_computation():
    target, student = P[0], P[1]
    expected = sum(q * math.log(q / s) for q, s in zip(target, student))
    out = distill_kl_per_position(_logits([student]), _logits([target], shift=-1.5))
    assert float(out[0, 0]) == pytest.approx(expected, rel=1e-5)
    both = distill_kl(_logits([student, target]), _logits([target, target]))
    assert float(both) == pytest.approx(expected / 2, rel=1e-5)


def test_kl_of_a_distribution_with_itself_is_zero():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(distill_kl_per_position(logits, logits), torch.zeros(3, 5), atol=1e-6)
    # and positive otherwise
    other = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    assert bool((distill_kl_per_position(other, logits) > 0).all())


def test_dfm_losses_registry_dispatches_to_the_functions():
    logits = _logits(P)
    ps = PathSample(
        x_0=torch.tensor([[3, 3]]), x_1=torch.tensor([[2, 0]]), x_t=torch.tensor([[2, 1]]), t=torch.tensor([0.5])
    )
    rate = torch.tensor([2.0])
    assert set(DFM_LOSSES.names()) >= {"ce", "gkl"}
    assert torch.equal(DFM_LOSSES.get("ce")(logits, ps, rate, None), cross_entropy(logits, ps.x_1))
    assert torch.equal(DFM_LOSSES.get("gkl")(logits, ps, rate, None), generalized_kl(logits, ps.x_1, ps.x_t, rate))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_log_probs_equals_the_materialised_log_softmax(k, chunk, with_bias):
    """Chunked log p(index) from hidden states: the same values and the same gradients (hidden, weight, bias) as
    log_softmax(F.linear(...)) on the whole (N, V) logits, for a cross-entropy (k = 1) and a generalized-KL-like
    combination of two indices (k = 2) weighted per row."""
    from fsdfm.losses import linear_log_probs

    g = torch.Generator().manual_seed(k * 10 + chunk)
    N, d, V = 37, 16, 300
    h = torch.randn(N, d, generator=g, dtype=torch.float64).float().requires_grad_()
    W = (0.3 * torch.randn(V, d, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    idx = torch.randint(V, (N, k), generator=g)
    w_rows = torch.rand(N, k, generator=g)
    ours = linear_log_probs(h, W, b, idx, chunk=chunk)
    loss = -(ours * w_rows).sum()
    params = [h, W] + ([b] if with_bias else [])
    grads = torch.autograd.grad(loss, params)
    ref = torch.log_softmax(torch.nn.functional.linear(h, W, b), -1).gather(-1, idx)
    ref_grads = torch.autograd.grad(-(ref * w_rows).sum(), params)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)
    # cross-entropy from the hidden states = F.cross_entropy on the materialised logits
    if k == 1:
        with torch.no_grad():
            ce = -linear_log_probs(h, W, b, idx, chunk=chunk).mean()
            full = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W, b), idx[:, 0])
        assert float(ce) == pytest.approx(float(full), rel=1e-5)
    with pytest.raises(ValueError, match="index must be"):
        linear_log_probs(h, W, b, idx[:, 0], chunk=chunk)
