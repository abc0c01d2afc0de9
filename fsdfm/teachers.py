"""Shortcut targets for FS-DFM distillation.

A shortcut teacher builds, with no gradient, the target logits for one student step of size h from
evaluations of a model `f(x, t, h)` at half the step size (the EMA copy of the student, or a frozen
DFM teacher). Intermediate states advance with the cumulative-scalar jump rule.

rk4 (as the official code does it; x_b has advanced a full h yet k3 is read at t + h/2; rk4_x1 is the same
composition with x_1 ~ p drawn on rows reaching t + h = 1, see `Jumper`):
    k1 = f(x_t, t, h/2);        x_a = J(x_t, k1, t, h/2)
    k2 = f(x_a, t + h/2, h/2);  x_b = J(x_a, k2, t + h/2, h/2)
    k3 = f(x_b, t + h/2, h/2);  x_c = J(x_b, k3, t + h/2, h/2)
    k4 = f(x_c, t + h, h/2);    target = (k1 + 2 k2 + 2 k3 + k4) / 6
rk4_time_consistent (ablation; every state sits at the time it is read at):
    x_a = J(x_t, k1, t, h/2);  x_b = J(x_t, k2, t, h/2);  x_c = J(x_t, k3, t, h);  same weights
heun:
    k1 = f(x_t, t, h/2);  x_a = J(x_t, k1, t, h/2);  k2 = f(x_a, t + h/2, h/2);  target = (k1 + k2) / 2
"""

from __future__ import annotations

from typing import Callable

import torch

from fsdfm.paths import MixturePath
from fsdfm.registry import Registry
from fsdfm.samplers import UPDATE_RULES, update

# The target compositions by name; fsdfm.objectives.SHORTCUTS says which one each `shortcut:` setting uses.
COMPOSITIONS: Registry = Registry("shortcut composition")
Evaluator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # f(x, t, h) -> logits


class Jumper:
    """J(x, logits, t, h): the cumulative-scalar jump of the sampler, float64.

    A row whose step reaches t + h = 1 has r = (1 - kappa(1)) / (1 - kappa(t)) = 0, so every movable position with
    p(z) < 1 jumps, to x != z drawn from p (the official code's behaviour, the default). x1_at_end=True (shortcut
    "rk4_x1", ours) instead ends such rows in a draw x_1 ~ p, which may keep z, like the sampler's last step. The two
    agree under the mask source (a masked z has p(z) = 0; unmasked tokens are frozen)."""

    def __init__(self, path: MixturePath, generator: torch.Generator | None, x1_at_end: bool = False):
        self.path, self.generator, self.x1_at_end = path, generator, x1_at_end
        self.rule = UPDATE_RULES.get("cumulative_scalar")

    def __call__(self, x, logits, t, h):
        p = torch.softmax(logits.double(), dim=-1)
        final = ((t + h) >= 1.0 - 1e-9) if self.x1_at_end else False
        return update(x, p, t.double(), h.double(), self.rule, self.path, self.generator, final=final)


@COMPOSITIONS.register("rk4")
def rk4_target(f: Evaluator, jump: Jumper, x_t, t, h):
    """x_t (B, L), t and h (B,) -> target logits (B, L, V). f is evaluated at step size h/2."""
    hh = h / 2
    k1 = f(x_t, t, hh)
    x_a = jump(x_t, k1, t, hh)
    k2 = f(x_a, t + hh, hh)
    x_b = jump(x_a, k2, t + hh, hh)
    k3 = f(x_b, t + hh, hh)
    x_c = jump(x_b, k3, t + hh, hh)
    k4 = f(x_c, t + h, hh)
    return (k1 + 2 * k2 + 2 * k3 + k4) / 6


COMPOSITIONS.register("rk4_x1", rk4_target)  # the same composition; its Jumper ends t + h = 1 rows in x_1 ~ p


@COMPOSITIONS.register("rk4_time_consistent")
def rk4_time_consistent_target(f: Evaluator, jump: Jumper, x_t, t, h):
    hh = h / 2
    k1 = f(x_t, t, hh)
    k2 = f(jump(x_t, k1, t, hh), t + hh, hh)
    k3 = f(jump(x_t, k2, t, hh), t + hh, hh)
    k4 = f(jump(x_t, k3, t, h), t + h, hh)
    return (k1 + 2 * k2 + 2 * k3 + k4) / 6


@COMPOSITIONS.register("heun")
def heun_target(f: Evaluator, jump: Jumper, x_t, t, h):
    hh = h / 2
    k1 = f(x_t, t, hh)
    k2 = f(jump(x_t, k1, t, hh), t + hh, hh)
    return (k1 + k2) / 2
