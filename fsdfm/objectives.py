"""Loss functions for `fit`: the DFM teacher's and the FS-DFM student's (consistency distillation).

Both are callables `objective(ctx: StepContext) -> scalar`, built from an injected path, so kappa(t)
comes from the path's scheduler only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fsdfm.losses import DFM_LOSSES, distill_kl_per_position, generalized_kl_per_position
from fsdfm.paths import MixturePath
from fsdfm.teachers import SHORTCUTS, Jumper
from fsdfm.train import StepContext

H_DISTRIBUTIONS = ("inv_h", "uniform", "annealed", "annealed_to_end")  # plus "fixed:N"
FROZEN_TEACHER_SHORTCUTS = ("frozen_dfm", "frozen_dfm_rk4")  # shortcuts that need the frozen DFM teacher
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
                raise ValueError(f"h_distribution must be one of {H_DISTRIBUTIONS} or 'fixed:N' with N a power of two "
                                 f"<= 2^K, got {self.h_distribution!r}")
        if self.anchor_weight not in ANCHOR_WEIGHTS:
            raise ValueError(f"anchor_weight must be one of {ANCHOR_WEIGHTS}, got {self.anchor_weight!r}")
        DFM_LOSSES.get(self.anchor_loss)
        if self.shortcut == "none" and self.anchor_weight == "G/h":
            raise ValueError("shortcut 'none' trains every h on data; its rows reach t + h = 1, where G/h is infinite: "
                             "use anchor_weight 'g'")
        if self.shortcut not in ("none", *FROZEN_TEACHER_SHORTCUTS):
            SHORTCUTS.get(self.shortcut)

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
    if cfg.h_distribution == "annealed":
        # the number of doublings so far; the 1e-9 keeps progress = 0.4 exactly at K doublings despite rounding
        doublings = math.floor(progress * cfg.K / ANNEAL_UNIFORM_AT + 1e-9)
        w = torch.clamp(2.0 ** (k + doublings), max=2.0**cfg.K)
        return h, w / w.sum()
    power = {"inv_h": 1.0, "uniform": 0.0, "annealed_to_end": 1.0 - progress}[cfg.h_distribution]
    w = (1.0 / h) ** power
    return h, w / w.sum()


def sample_step_sizes(cfg: FSDFMConfig, n: int, generator: torch.Generator, progress: float = 0.0,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
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
        if cfg.shortcut in FROZEN_TEACHER_SHORTCUTS and frozen_teacher is None:
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
        anchor = torch.ones_like(h, dtype=torch.bool) if self.cfg.shortcut == "none" else finest
        per_pos = torch.zeros(x_1.shape, dtype=torch.float32, device=x_1.device)
        shortcut_rows = ~anchor
        if self.cfg.shortcut == "frozen_dfm":
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
                ce = torch.nn.functional.cross_entropy(logits[a].float().flatten(0, 1), x_1[a].flatten(), reduction="none")
                per_pos[a] = ce.view(-1, x_1.shape[1])
        if bool(shortcut_rows.any()):
            s = shortcut_rows.nonzero(as_tuple=True)[0]
            target = self.shortcut_target(ctx, ps.x_t[s], t[s], h[s])
            per_pos[s] = distill_kl_per_position(logits[s], target)
        w = weight.float() if self.cfg.anchor_loss == "ce" or self.cfg.shortcut in ("none", "frozen_dfm") else \
            torch.where(anchor[:, None], torch.ones_like(weight, dtype=torch.float32), weight.float())
        return (per_pos * w).sum() / w.sum().clamp_min(1.0)

    @torch.no_grad()
    def shortcut_target(self, ctx: StepContext, x_t, t, h) -> torch.Tensor:
        if self.cfg.shortcut == "frozen_dfm_rk4":
            def f(x, tt, hh):
                return self.frozen_teacher(x, tt.float()).float()
            combine = SHORTCUTS.get("rk4")
        else:
            net = ctx.ema if ctx.ema is not None else ctx.model

            def f(x, tt, hh):
                return net(x, tt.float(), hh.float()).float()
            combine = SHORTCUTS.get("rk4" if self.cfg.shortcut == "frozen_dfm" else self.cfg.shortcut)
        return combine(f, Jumper(self.path, ctx.generator, x1_at_end=self.cfg.shortcut == "rk4_x1"), x_t, t, h)


def expected_h_weights(cfg: FSDFMConfig) -> dict[float, float]:
    """P(h) as a dict, for reports and tests."""
    h, p = step_size_probs(cfg)
    return {float(a): float(b) for a, b in zip(h, p)}


__all__ = ["DFMConfig", "DFMObjective", "FSDFMConfig", "FSDFMObjective", "sample_step_sizes", "step_size_probs",
           "expected_h_weights"]
