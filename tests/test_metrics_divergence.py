"""Per-position divergence with fake rollouts: known answers and a dense-histogram reference."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fsdfm.metrics.divergence import fit_slope, pos_divergence

V, L = 6, 8
MASK = V


def fill(x, g):
    """Deterministic 'sampler': masked position l becomes token l % V."""
    pos = torch.arange(x.shape[1]).expand_as(x) % V
    return torch.where(x == MASK, pos, x)


def start_states(n=3):
    x = torch.full((n, L), MASK)
    x[:, 0] = 2  # one already decoded position
    return x


def test_identical_deterministic_rollouts_have_zero_divergence():
    result = pos_divergence(start_states(), fill, fill, n_rollouts=4, vocab_size=V, generator=torch.Generator())
    assert result.tv.shape == (L,) and result.js.shape == (L,) and result.agreement.shape == (L,)
    assert torch.all(result.tv == 0) and torch.all(result.js == 0) and torch.all(result.agreement == 1)
    assert result.slope == 0.0 and result.mean_tv == 0.0
    assert result.n_starts == 3 and result.n_rollouts == 4


def test_student_wrong_on_second_half_has_positive_slope():
    def student(x, g):
        out = fill(x, g).clone()
        out[:, L // 2 :] = (out[:, L // 2 :] + 1) % V
        return out

    result = pos_divergence(start_states(), fill, student, n_rollouts=2, vocab_size=V, batch_size=4)
    half = [0.0] * (L // 2) + [1.0] * (L // 2)
    assert result.tv.tolist() == half
    assert result.agreement.tolist() == [1 - h for h in half]
    torch.testing.assert_close(result.js, torch.tensor(half, dtype=torch.float64) * math.log(2))
    assert result.slope > 0 and result.slope > 3 * result.slope_stderr


def test_known_tv_two_tokens():
    # per start state the 4 rollouts are consecutive rows: teacher 0,0,0,1 -> p = (3/4, 1/4); student 0,1,1,1
    def pattern(first_ones):
        def rollout(x, g):
            r = torch.arange(x.shape[0]) % 4
            return (r >= first_ones).long().unsqueeze(1).expand(-1, x.shape[1]).clone()

        return rollout

    result = pos_divergence(torch.full((2, 3), 2), pattern(3), pattern(1), n_rollouts=4, vocab_size=2)
    torch.testing.assert_close(result.tv, torch.full((3,), 0.5, dtype=torch.float64))
    js = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(p || m) = KL(q || m) with m = (1/2, 1/2)
    torch.testing.assert_close(result.js, torch.full((3,), js, dtype=torch.float64))
    torch.testing.assert_close(result.agreement, torch.full((3,), 0.5, dtype=torch.float64))  # rows 0 and 3 agree


def test_random_rollouts_match_dense_histograms():
    gen = torch.Generator().manual_seed(0)

    def noisy(bias):
        def rollout(x, g):
            logits = torch.zeros(x.shape[0], x.shape[1], V)
            logits[..., 0] += bias * torch.linspace(0, 3, x.shape[1])
            return torch.distributions.Categorical(logits=logits).sample()

        return rollout

    torch.manual_seed(0)
    x = start_states(4)
    result = pos_divergence(x, noisy(0.0), noisy(1.0), n_rollouts=50, vocab_size=V, generator=gen)
    # reproduce with the same global seed, then compute dense per-(start, position) histograms by hand
    torch.manual_seed(0)
    rep = x.repeat_interleave(50, dim=0)
    t = noisy(0.0)(rep, gen).view(4, 50, L).numpy()
    s = noisy(1.0)(rep, gen).view(4, 50, L).numpy()
    tv, js = np.zeros(L), np.zeros(L)
    for i in range(4):
        for l in range(L):
            p = np.bincount(t[i, :, l], minlength=V) / 50
            q = np.bincount(s[i, :, l], minlength=V) / 50
            m = (p + q) / 2
            tv[l] += 0.5 * np.abs(p - q).sum() / 4
            js[l] += (
                0.5
                * (
                    sum(a * np.log(a / b) for a, b in zip(p, m) if a > 0)
                    + sum(a * np.log(a / b) for a, b in zip(q, m) if a > 0)
                )
                / 4
            )
    np.testing.assert_allclose(result.tv.numpy(), tv, atol=1e-12)
    np.testing.assert_allclose(result.js.numpy(), js, atol=1e-12)
    np.testing.assert_allclose(result.agreement.numpy(), (t == s).mean(axis=(0, 1)))
    assert result.slope > 0  # the student's bias towards token 0 grows along the sequence


def test_fit_slope_matches_scipy_linregress():
    y = torch.tensor([0.1, 0.3, 0.2, 0.5, 0.4, 0.7], dtype=torch.float64)
    fit = fit_slope(y)
    ref = stats.linregress(np.linspace(0, 1, 6), y.numpy())
    assert fit.slope == pytest.approx(ref.slope) and fit.intercept == pytest.approx(ref.intercept)
    assert fit.slope_stderr == pytest.approx(ref.stderr)
    with pytest.raises(ValueError, match="at least 3"):
        fit_slope(torch.tensor([0.0, 1.0]))


def test_bad_rollouts_raise():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pos_divergence(start_states(), lambda x, g: x, fill, n_rollouts=2, vocab_size=V)  # mask left in
    with pytest.raises(ValueError, match="shape"):
        pos_divergence(start_states(), lambda x, g: fill(x, g)[:, :-1], fill, n_rollouts=2, vocab_size=V)
    with pytest.raises(ValueError, match="n_rollouts"):
        pos_divergence(start_states(), fill, fill, n_rollouts=0, vocab_size=V)
