"""SDTT's target (fsdfm.sdtt) against brute-force enumeration of two teacher steps on a tiny source."""

from __future__ import annotations

import itertools

import pytest
import torch

from fsdfm.paths import make_path
from fsdfm.schedulers import make_scheduler
from fsdfm.sdtt import SDTTConfig, distill_loss, teacher_two_steps, two_step_target, unmask_probs

V, L = 3, 3
MASK = V


class TableTeacher:
    """A fake teacher: fixed random logits per (input sequence, position), tilted by t (so p1 and p2 differ)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = {
            x: torch.randn(L, V, generator=g, dtype=torch.float64) * 1.5
            for x in itertools.product(range(V + 1), repeat=L)
        }
        self.tilt = torch.randn(L, V, generator=g, dtype=torch.float64)

    def __call__(self, x, t, h=None):
        return torch.stack([self.table[tuple(r.tolist())] + float(tt) * self.tilt for r, tt in zip(x, t)])


def step_law(x, p, a):
    """All outcomes of one mask-source step from x (tuple) with denoiser p (L, V) and unmasking prob a:
    {outcome tuple: probability}, enumerated position by position."""
    per_pos = []
    for i, z in enumerate(x):
        if z != MASK:
            per_pos.append([(z, 1.0)])
        else:
            per_pos.append([(MASK, 1.0 - a)] + [(v, a * float(p[i, v])) for v in range(V)])
    law = {}
    for combo in itertools.product(*per_pos):
        prob = 1.0
        for _, q in combo:
            prob *= q
        law[tuple(v for v, _ in combo)] = law.get(tuple(v for v, _ in combo), 0.0) + prob
    return law


@pytest.mark.parametrize("x_t", [(MASK, MASK, MASK), (MASK, 1, MASK)])
@pytest.mark.parametrize("t0, h", [(0.1, 0.2), (0.5, 0.25)])
def test_the_marginal_target_equals_two_teacher_steps_enumerated(x_t, t0, h):
    path = make_path(make_scheduler("polynomial", n=2), "mask", V)
    teacher = TableTeacher()
    t = torch.tensor([t0], dtype=torch.float64)
    a1, a2 = unmask_probs(path, t, h)
    p1 = torch.softmax(teacher(torch.tensor([x_t]), t), -1)[0]
    # brute force: the law of x_{t+2h}, then its per-position marginals given "unmasked by t + 2h"
    end = {}
    for x_mid, pm in step_law(x_t, p1, float(a1)).items():
        p2 = torch.softmax(teacher(torch.tensor([x_mid]), t + h), -1)[0]
        for x_end, pe in step_law(x_mid, p2, float(a2)).items():
            end[x_end] = end.get(x_end, 0.0) + pm * pe
    assert abs(sum(end.values()) - 1.0) < 1e-12
    # the library's one-trajectory target, averaged over every x_mid with its exact probability
    expected = torch.zeros(L, V, dtype=torch.float64)
    for x_mid, pm in step_law(x_t, p1, float(a1)).items():
        xm = torch.tensor([x_mid])
        p2 = torch.softmax(teacher(xm, t + h), -1)
        expected += pm * two_step_target(p1[None], p2, xm, a1, a2, MASK)[0]
    for i in range(L):
        if x_t[i] != MASK:
            continue
        marginal = torch.tensor([sum(p for x, p in end.items() if x[i] == v) for v in range(V)], dtype=torch.float64)
        assert torch.allclose(expected[i], marginal / marginal.sum(), atol=1e-12)
        # the masked mass is the path's (independent of the teacher): r_2 = (1 - kappa(t+2h)) / (1 - kappa(t))
        r2 = (1 - path.scheduler.kappa(t + 2 * h)) / (1 - path.scheduler.kappa(t))
        assert abs(1.0 - marginal.sum().item() - float(r2)) < 1e-12


def test_the_trajectory_target_is_the_unmasking_steps_prediction():
    """The authors' target: p1 where the first step unmasked the position, else p2."""
    p1 = torch.full((1, 2, V), 1.0 / V, dtype=torch.float64)
    p2 = torch.softmax(torch.arange(2 * V, dtype=torch.float64).view(1, 2, V), -1)
    x_mid = torch.tensor([[2, MASK]])
    q = two_step_target(p1, p2, x_mid, torch.tensor([0.3]), torch.tensor([0.5]), MASK, "trajectory")
    assert torch.equal(q[0, 0], p1[0, 0]) and torch.equal(q[0, 1], p2[0, 1])


def test_teacher_two_steps_draws_x_mid_from_the_first_step_law():
    """Monte Carlo: frequencies of x_mid over 20,000 draws against the enumerated first-step law."""
    path = make_path(make_scheduler("polynomial", n=1), "mask", V)
    teacher = TableTeacher(1)
    x_t, t, h, n = (MASK, 0, MASK), 0.2, 0.3, 20_000
    x = torch.tensor([x_t] * n)
    tt = torch.full((n,), t, dtype=torch.float64)
    _, x_mid, _ = teacher_two_steps(teacher, path, x, tt, h, torch.Generator().manual_seed(0))
    (a1, _) = unmask_probs(path, tt[:1], h)
    law = step_law(x_t, torch.softmax(teacher(x[:1], tt[:1]), -1)[0], float(a1))
    for outcome, p in law.items():
        freq = (x_mid == torch.tensor(outcome)).all(-1).double().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9


def test_forward_kl_loss_is_linear_in_the_target():
    """An unbiased target estimate gives an unbiased loss: the mean of the losses is the loss of the mean."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, V, generator=g)
    qa, qb = torch.rand(1, 2, V, generator=g).double(), torch.rand(1, 2, V, generator=g).double()
    w = torch.ones(1, 2)
    mean = distill_loss(logits, (qa + qb) / 2, w, "kl")
    assert (
        abs(float(mean) - (float(distill_loss(logits, qa, w, "kl")) + float(distill_loss(logits, qb, w, "kl"))) / 2)
        < 1e-6
    )


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": 3, "base_steps": 12}, "base_steps"),
        ({"loss": "l1"}, "loss"),
        ({"target": "x"}, "target"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, what):
    with pytest.raises(ValueError, match=what):
        SDTTConfig(**kwargs)
