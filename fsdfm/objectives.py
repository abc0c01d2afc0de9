"""Loss functions for `fit`: the DFM teacher's and the FS-DFM student's (consistency distillation).

Both are callables `objective(ctx: StepContext) -> scalar`, built from an injected path, so kappa(t)
comes from the path's scheduler only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from fsdfm.losses import DFM_LOSSES, distill_kl_per_position, generalized_kl_per_position
from fsdfm.paths import MixturePath
from fsdfm.registry import Registry
from fsdfm.teachers import COMPOSITIONS, Jumper
from fsdfm.train import StepContext


@dataclass(frozen=True)
class Shortcut:
    """One `shortcut:` setting of FS-DFM distillation: everything FSDFMObjective branches on.

    composition: the fsdfm.teachers.COMPOSITIONS entry that builds the target of the rows coarser than h_min;
        None: there are no shortcut rows (every row is a data anchor).
    uses_frozen_teacher: the frozen DFM teacher is needed (as the composition's evaluator, or for the h_min rows).
    frozen_evaluates: the frozen teacher, not the EMA student, evaluates the composition (f(x, t), no h).
    finest_from_teacher: the h_min rows learn the frozen teacher's p(. | x_t, t) instead of the data.
    anchor_everywhere: every row is a data anchor (DFM loss at every h).
    x1_at_end: the composition's Jumper ends rows reaching t + h = 1 in a draw x_1 ~ p.
    """

    composition: str | None
    uses_frozen_teacher: bool = False
    frozen_evaluates: bool = False
    finest_from_teacher: bool = False
    anchor_everywhere: bool = False
    x1_at_end: bool = False

    @property
    def masks_all_positions(self) -> bool:
        """The loss averages over movable positions on every row (no data-anchor rows weighted over all)."""
        return self.anchor_everywhere or self.finest_from_teacher


SHORTCUTS: Registry[Shortcut] = Registry("shortcut teacher")
SHORTCUTS.register("rk4", Shortcut("rk4"))
SHORTCUTS.register("rk4_x1", Shortcut("rk4_x1", x1_at_end=True))
SHORTCUTS.register("rk4_time_consistent", Shortcut("rk4_time_consistent"))
SHORTCUTS.register("heun", Shortcut("heun"))
SHORTCUTS.register("none", Shortcut(None, anchor_everywhere=True))
SHORTCUTS.register("frozen_dfm", Shortcut("rk4", uses_frozen_teacher=True, finest_from_teacher=True))
SHORTCUTS.register("frozen_dfm_rk4", Shortcut("rk4", uses_frozen_teacher=True, frozen_evaluates=True))
FROZEN_TEACHER_SHORTCUTS = tuple(n for n in SHORTCUTS.names() if SHORTCUTS.get(n).uses_frozen_teacher)


# The step-size distributions by name: each maps training progress in [0, 1] to the power a of P(h) ~ (1/h)^a,
# or None for the official annealed doubling schedule. "fixed:N" (one budget) is parsed, not listed.
H_DISTRIBUTIONS: dict[str, Callable[[float], float | None]] = {
    "inv_h": lambda progress: 1.0,
    "uniform": lambda progress: 0.0,
    "annealed": lambda progress: None,  # not a power law: the official doubling schedule (`step_size_probs`)
    "annealed_to_end": lambda progress: 1.0 - progress,
}
# The official schedule doubles every weight 2^k (k = log2(1/h)) once per interval, capped at 2^K; after K
# doublings every weight is 2^K, i.e. uniform. Its interval (20,000 of 500,000 steps, K = 10) puts that at 40%.
ANNEAL_UNIFORM_AT = 0.4
ANCHOR_WEIGHTS = ("g", "G/h")


@dataclass(frozen=True)
class DFMConfig:
    """The DFM teacher objective: loss "ce" or "gkl"; t ~ U[0, 1 - eps]."""

    loss: str = "ce"
    eps: float = 1e-3

    def __post_init__(self):
        DFM_LOSSES.get(self.loss)
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")


class DFMObjective:
    """x_t ~ p_t(. | x_1), logits = f(x_t, t); CE (on movable positions) or generalized KL."""

    def __init__(self, path: MixturePath, cfg: DFMConfig = DFMConfig()):
        self.path, self.cfg = path, cfg
        self.loss = DFM_LOSSES.get(cfg.loss)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        t = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator) * (1.0 - self.cfg.eps)
        ps = self.path.sample(x_1, t, ctx.generator)
        logits = ctx.model(ps.x_t, t)
        weight = self.path.source.movable(ps.x_t) if self.cfg.loss == "ce" else None
        return self.loss(logits, ps, self.path.scheduler(t).rate, weight)


@dataclass(frozen=True)
class FSDFMConfig:
    """Every knob of the FS-DFM student objective (DESIGN 2.2).

    K: step sizes h in {2^0, ..., 2^-K}; h_min = 2^-K rows are the data anchor.
    h_distribution: "inv_h" (P(h) ~ 1/h), "uniform", "annealed" (the official schedule: weights
        w_k = min(2^(k + floor(progress K / 0.4)), 2^K) for h = 2^-k, so P(h) goes from 1/h to uniform in K
        doublings and is uniform from 40% of training on), "annealed_to_end" (ours: P(h) ~ (1/h)^(1 - progress),
        uniform only at the end), or "fixed:N" (a single budget: half the rows at h = 1/N, half anchor rows at h_min).
    anchor_weight: "g" (g(t), the generalized-KL rate) or "G/h" (the step-averaged rate G_{t,h}/h).
    anchor_loss: "gkl" or "ce" for the anchor rows.
    shortcut: "rk4" (rows reaching t + h = 1 jump as the official code forces them to), "rk4_x1" (those rows draw
        x_1 ~ p instead: ours), "heun", "rk4_time_consistent", "none" (DFM loss at every h), "frozen_dfm" (the design
        brief's ablation, the finest-step rule of the official just_student=False mode without its co-training of
        the teacher: rows at h = h_min are distilled from the frozen DFM teacher's p_1t(. | x_t, t) instead of
        trained on data; coarser rows use the RK-4 target of the EMA student; the official default,
        just_student=True, is "rk4": generalized KL to the data at h_min) or "frozen_dfm_rk4" (ours: the RK-4 composition evaluated by the frozen DFM teacher at every
        coarser h, data anchors at h_min).
    """

    K: int = 10
    h_distribution: str = "inv_h"
    anchor_weight: str = "g"
    anchor_loss: str = "gkl"
    shortcut: str = "rk4"

    def __post_init__(self):
        if not 1 <= self.K <= 20:
            raise ValueError(f"K must be in 1..20, got {self.K}")
        if self.h_distribution not in H_DISTRIBUTIONS:
            n = self.fixed_budget
            if n is None or n < 1 or n & (n - 1) or n > 2**self.K:
                raise ValueError(
                    f"h_distribution must be one of {tuple(H_DISTRIBUTIONS)} or 'fixed:N' with N a power of two "
                    f"<= 2^K, got {self.h_distribution!r}"
                )
        if self.anchor_weight not in ANCHOR_WEIGHTS:
            raise ValueError(f"anchor_weight must be one of {ANCHOR_WEIGHTS}, got {self.anchor_weight!r}")
        DFM_LOSSES.get(self.anchor_loss)
        rule = SHORTCUTS.get(self.shortcut)
        if rule.anchor_everywhere and self.anchor_weight == "G/h":
            raise ValueError(
                f"shortcut {self.shortcut!r} trains every h on data; its rows reach t + h = 1, where G/h is "
                "infinite: use anchor_weight 'g'"
            )

    @property
    def shortcut_entry(self) -> Shortcut:
        """The registry entry of `shortcut` (SHORTCUTS: what the shortcut target does), not an update rule."""
        return SHORTCUTS.get(self.shortcut)

    @property
    def fixed_budget(self) -> int | None:
        if self.h_distribution.startswith("fixed:"):
            try:
                return int(self.h_distribution.split(":", 1)[1])
            except ValueError:
                return None
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def step_size_probs(cfg: FSDFMConfig, progress: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The support h_k (float64) and probabilities P(h_k) of the step-size distribution."""
    n = cfg.fixed_budget
    if n is not None:
        h = torch.tensor(sorted({1.0 / n, 2.0**-cfg.K}, reverse=True), dtype=torch.float64)
        return h, torch.full_like(h, 1.0 / h.numel())
    k = torch.arange(cfg.K + 1, dtype=torch.float64)
    h = 2.0**-k
    progress = min(max(progress, 0.0), 1.0)
    power = H_DISTRIBUTIONS[cfg.h_distribution](progress)
    if power is None:
        # the number of doublings so far; the 1e-9 keeps progress = 0.4 exactly at K doublings despite rounding
        doublings = math.floor(progress * cfg.K / ANNEAL_UNIFORM_AT + 1e-9)
        w = torch.clamp(2.0 ** (k + doublings), max=2.0**cfg.K)
        return h, w / w.sum()
    w = (1.0 / h) ** power
    return h, w / w.sum()


def sample_step_sizes(
    cfg: FSDFMConfig, n: int, generator: torch.Generator, progress: float = 0.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw h (n,) from the step-size distribution and t (n,) on the 2^-K grid with t + h <= 1.

    Under anchor_weight "G/h" the anchor rows (h = h_min) keep t + h < 1, where G_{t,h} is finite.
    """
    support, probs = step_size_probs(cfg, progress)
    k = torch.multinomial(probs.to(device), n, replacement=True, generator=generator)
    h = support.to(device)[k]
    grid = 2**cfg.K
    n_slots = torch.round((1.0 - h) * grid).long() + 1  # t in {0, 1/grid, ..., 1 - h}
    if cfg.anchor_weight == "G/h":
        n_slots = n_slots - (h <= 2.0**-cfg.K).long()
    j = (torch.rand(n, dtype=torch.float64, device=device, generator=generator) * n_slots).floor().long()
    return h, j.double() / grid


class FSDFMObjective:
    """The FS-DFM student objective.

    Anchor rows (h = h_min, or every row when shortcut = "none"): DFM loss against the data, weighted per
    row by g(t) or G_{t,h}/h. Shortcut rows: KL(target || student) on logits, the target built without
    gradient by the shortcut teacher from `ctx.ema` (or the live student when EMA is off, or the frozen
    DFM teacher for shortcut = "frozen_dfm_rk4") evaluated at h/2. Under shortcut = "frozen_dfm" the h_min rows
    are distillation rows too, their target the frozen teacher's logits f_teacher(x_t, t) (no data term).
    """

    def __init__(self, path: MixturePath, cfg: FSDFMConfig = FSDFMConfig(), frozen_teacher: nn.Module | None = None):
        if cfg.shortcut_entry.uses_frozen_teacher and frozen_teacher is None:
            raise ValueError(f"shortcut {cfg.shortcut!r} needs the frozen DFM teacher")
        self.path, self.cfg, self.frozen_teacher = path, cfg, frozen_teacher
        self.h_min = 2.0**-cfg.K

    def anchor_rate(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        sched = self.path.scheduler
        if self.cfg.anchor_weight == "g":
            return sched(t).rate
        return sched.cumulative_rate(t, h) / h

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        B = x_1.shape[0]
        h, t = sample_step_sizes(self.cfg, B, ctx.generator, ctx.step / max(1, ctx.total_steps), x_1.device)
        ps = self.path.sample(x_1, t, ctx.generator)
        logits = ctx.model(ps.x_t, t.float(), h.float())
        weight = self.path.source.movable(ps.x_t)  # positions that may still move carry the loss
        finest = h <= self.h_min * (1 + 1e-9)
        rule = self.cfg.shortcut_entry
        anchor = torch.ones_like(h, dtype=torch.bool) if rule.anchor_everywhere else finest
        per_pos = torch.zeros(x_1.shape, dtype=torch.float32, device=x_1.device)
        shortcut_rows = ~anchor
        if rule.finest_from_teacher:
            # the finest rows learn the frozen teacher's prediction, not the data: no data anchor at all
            if bool(finest.any()):
                f = finest.nonzero(as_tuple=True)[0]
                with torch.no_grad():
                    target = self.frozen_teacher(ps.x_t[f], t[f].float()).float()
                per_pos[f] = distill_kl_per_position(logits[f], target)
            anchor = torch.zeros_like(finest)
        if bool(anchor.any()):
            a = anchor.nonzero(as_tuple=True)[0]
            if self.cfg.anchor_loss == "gkl":
                per_pos[a] = generalized_kl_per_position(logits[a], x_1[a], ps.x_t[a], self.anchor_rate(t[a], h[a]))
            else:
                ce = torch.nn.functional.cross_entropy(
                    logits[a].float().flatten(0, 1), x_1[a].flatten(), reduction="none"
                )
                per_pos[a] = ce.view(-1, x_1.shape[1])
        if bool(shortcut_rows.any()):
            s = shortcut_rows.nonzero(as_tuple=True)[0]
            target = self.shortcut_target(ctx, ps.x_t[s], t[s], h[s])
            per_pos[s] = distill_kl_per_position(logits[s], target)
        w = (
            weight.float()
            if self.cfg.anchor_loss == "ce" or rule.masks_all_positions
            else torch.where(anchor[:, None], torch.ones_like(weight, dtype=torch.float32), weight.float())
        )
        return (per_pos * w).sum() / w.sum().clamp_min(1.0)

    @torch.no_grad()
    def shortcut_target(self, ctx: StepContext, x_t, t, h) -> torch.Tensor:
        rule = self.cfg.shortcut_entry
        if rule.frozen_evaluates:

            def f(x, tt, hh):
                return self.frozen_teacher(x, tt.float()).float()
        else:
            net = ctx.ema if ctx.ema is not None else ctx.model

            def f(x, tt, hh):
                return net(x, tt.float(), hh.float()).float()

        combine = COMPOSITIONS.get(rule.composition)
        return combine(f, Jumper(self.path, ctx.generator, x1_at_end=rule.x1_at_end), x_t, t, h)


def expected_h_weights(cfg: FSDFMConfig) -> dict[float, float]:
    """P(h) as a dict, for reports and tests."""
    h, p = step_size_probs(cfg)
    return {float(a): float(b) for a, b in zip(h, p)}


__all__ = [
    "SHORTCUTS",
    "H_DISTRIBUTIONS",
    "Shortcut",
    "DFMConfig",
    "DFMObjective",
    "FSDFMConfig",
    "FSDFMObjective",
    "sample_step_sizes",
    "step_size_probs",
    "expected_h_weights",
]
