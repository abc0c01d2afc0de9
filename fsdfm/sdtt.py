"""SDTT: self-distillation through time (Deschenaux & Gulcehre 2024, arXiv 2410.21035) on the mask-source path.

A round halves the number of sampling steps: a student p_s(. | x_t, t), initialised from its teacher, learns to do
in one step of size 2h what the frozen teacher does in two steps of size h; the next round's teacher is that
student. `rounds` rounds from a teacher sampled at `base_steps` steps give a student for base_steps / 2^rounds.

The target (this suite's definition, `target="marginal"`). Under the mask source a masked position i of x_t, after
one cumulative-scalar step t -> t + 2h with denoiser q_i, is still masked w.p. r_2 = (1 - kappa(t+2h)) /
(1 - kappa(t)) and equals v w.p. (1 - r_2) q_i(v). The teacher's two steps keep it masked with the same r_2 (the
unmasking times do not depend on the network), and unmask it to v w.p.

    P_i(v) = a_1 p1_i(v) + (1 - a_1) a_2 E[ p2_i(v | x_mid) | x_mid_i masked ],
    a_1 = 1 - (1 - kappa(t+h)) / (1 - kappa(t)),  a_2 = 1 - (1 - kappa(t+2h)) / (1 - kappa(t+h)),

p1 = p_T(. | x_t, t), p2 = p_T(. | x_mid, t + h), x_mid one teacher step from x_t. So the one-step student that
reproduces the teacher's two-step per-position marginals has q_i = P_i / (1 - r_2): that is the target. The
expectation over x_mid is estimated from one teacher trajectory without bias, using that the first step moves
positions independently given x_t (so P(x_mid_i masked) = 1 - a_1 and the other positions' law does not depend on
position i's draw):

    q^_i(v) = ( a_1 p1_i(v) + 1[x_mid_i masked] a_2 p2_i(v | x_mid) ) / (1 - r_2),    E[q^_i] = q_i.

q^ sums to 1 only in expectation; the forward KL / cross-entropy -sum_v q^(v) log p_s(v) is linear in it, so its
gradient is unbiased for KL(q || p_s) (the default loss, "kl"). For the non-linear losses (kl_bwd, mse, tvd) q^ is
renormalised per position, which is biased.

Where this follows / deviates from the authors' code (jdeschena/sdtt, read for facts only; no licence file):
- Same: the student starts from the teacher and becomes the next round's teacher (their `_student_to_teacher`,
  raw weights, not the EMA: use_ema_on_growth False); two teacher steps per student step (num_distill_steps 2);
  the loss is taken on the positions masked in x_t only; losses kl-fwd / kl-bwd / mse / tvd.
- Deviation 1 (the target): the authors' target for a masked position is the teacher's prediction at the step
  where the trajectory unmasked it, else the last step's prediction: E = a_1 p1 + (1 - a_1) E[p2 | masked], a
  normalised mixture that weighs p1 by a_1 where the two-step marginal weighs it by a_1 / (1 - r_2) (at small h,
  ~1/2 against ~h). It is available as `target="trajectory"`; "marginal" is the default because it is the exact
  answer to "one student step = two teacher steps, position by position" (tests/test_sdtt.py checks it by
  enumeration).
- Deviation 2 (the default loss): theirs is kl-bwd, KL(p_s || target); ours is forward KL, the one loss whose
  gradient the one-trajectory estimate q^ leaves unbiased. kl_bwd is the option that reproduces theirs.
- Deviation 3 (schedule): they grow h every `grow_dt_every` optimiser steps (10,000) from 1,024 steps down to 8
  (7 rounds); here `rounds` and `base_steps` are settings and each round trains `train.steps` optimiser steps.
  Their t is continuous (MDLM time, t = 1 noise); ours is t ~ U[0, 1 - 2h] on the suite's time (t = 1 data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fsdfm.paths import MixturePath
from fsdfm.samplers import get_rule, update
from fsdfm.train import StepContext

SDTT_TARGETS = ("marginal", "trajectory")
SDTT_LOSSES = ("kl", "kl_bwd", "mse", "tvd")


@dataclass(frozen=True)
class SDTTConfig:
    """rounds: x2 step reductions (authors: 7, from 1,024 to 8); base_steps: the first teacher's sampling steps
    (authors: 1,024); target: "marginal" (ours, the exact two-step per-position marginal) or "trajectory" (the
    authors'); loss: "kl" (forward, default), "kl_bwd" (the authors' default), "mse" or "tvd" on probabilities."""

    rounds: int = 3
    base_steps: int = 64
    target: str = "marginal"
    loss: str = "kl"

    def __post_init__(self):
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if not (isinstance(self.base_steps, int) and self.base_steps >= 2 ** (self.rounds)):
            raise ValueError(f"base_steps must be an integer >= 2^rounds = {2**self.rounds}, got {self.base_steps!r}")
        if self.base_steps % 2**self.rounds:
            raise ValueError(f"base_steps {self.base_steps} must be divisible by 2^rounds = {2**self.rounds}")
        if self.target not in SDTT_TARGETS:
            raise ValueError(f"target must be one of {', '.join(SDTT_TARGETS)}, got {self.target!r}")
        if self.loss not in SDTT_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(SDTT_LOSSES)}, got {self.loss!r}")

    def teacher_steps(self, r: int) -> int:
        """Sampling steps of round r's teacher (r = 0 .. rounds - 1); its student runs half as many."""
        return self.base_steps // 2**r

    @property
    def student_steps(self) -> int:
        return self.base_steps // 2**self.rounds


def unmask_probs(path: MixturePath, t: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_1, a_2): probability that a masked position unmasks in the step t -> t + h, and in t + h -> t + 2h
    given it is still masked. t: (B,) -> two (B,) tensors (float64)."""
    t = t.to(torch.float64)
    hh = torch.full_like(t, h)
    a1 = 1.0 - path.scheduler.survival_ratio(t, hh)
    a2 = 1.0 - path.scheduler.survival_ratio(t + h, hh)
    return a1, a2


def two_step_target(
    p1: torch.Tensor,
    p2: torch.Tensor,
    x_mid: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    mask_id: int,
    target: str = "marginal",
) -> torch.Tensor:
    """The one-trajectory SDTT target q^ (module docstring) at every position (meaningful where x_t is masked).

    Args: p1, p2 (B, L, V) teacher probabilities at (x_t, t) and (x_mid, t + h); x_mid (B, L) long, the teacher's
        first step; a1, a2 (B,) from `unmask_probs`; target "marginal" or "trajectory".
    Returns: (B, L, V) float64; "marginal" rows sum to (a_1 + 1[x_mid masked] a_2) / (1 - r_2), 1 in expectation.
    """
    p1, p2 = p1.to(torch.float64), p2.to(torch.float64)
    masked_mid = (x_mid == mask_id)[..., None]
    if target == "trajectory":
        return torch.where(masked_mid, p2, p1)
    a1, a2 = a1.to(torch.float64)[:, None, None], a2.to(torch.float64)[:, None, None]
    unmasked_by_end = 1.0 - (1.0 - a1) * (1.0 - a2)  # 1 - r_2
    return (a1 * p1 + masked_mid * a2 * p2) / unmasked_by_end


@torch.no_grad()
def teacher_two_steps(teacher, path: MixturePath, x_t: torch.Tensor, t: torch.Tensor, h: float, generator):
    """Two cumulative-scalar teacher steps of size h from x_t: returns (p1, x_mid, p2), p's (B, L, V) float64."""
    p1 = torch.softmax(teacher(x_t, t).double(), -1)
    hh = torch.full_like(t, h, dtype=torch.float64)
    x_mid = update(x_t, p1, t.double(), hh, get_rule("cumulative_scalar"), path, generator)
    p2 = torch.softmax(teacher(x_mid, t + h).double(), -1)
    return p1, x_mid, p2


def distill_loss(logits: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over the positions with weight 1 of the divergence between target q (B, L, V) and softmax(logits)."""
    logp = torch.log_softmax(logits.double(), -1)
    if loss == "kl":  # forward KL up to the target's entropy (constant in the student): linear in q
        per = -(q * logp).sum(-1)
    else:
        qn = q / q.sum(-1, keepdim=True).clamp_min(1e-300)
        if loss == "kl_bwd":
            per = (logp.exp() * (logp - torch.log(qn.clamp_min(1e-300)))).sum(-1)
        elif loss == "mse":
            per = ((logp.exp() - qn) ** 2).sum(-1)
        else:  # tvd, as the authors' (sum of absolute differences)
            per = (logp.exp() - qn).abs().sum(-1)
    w = weight.to(per.dtype)
    return ((per * w).sum() / w.sum().clamp_min(1.0)).float()


class SDTTObjective:
    """One SDTT round: t ~ U[0, 1 - 2h], x_t ~ p_t(. | x_1), target from two frozen-teacher steps of size h,
    loss on the positions masked in x_t. Two teacher forwards per training row (`TEACHER_NFE`)."""

    TEACHER_NFE = 2

    def __init__(self, teacher, path: MixturePath, cfg: SDTTConfig, h: float):
        if path.source.name != "mask":
            raise ValueError(f"SDTT distils a mask-source teacher, got source {path.source.name!r}")
        self.teacher, self.path, self.cfg, self.h = teacher, path, cfg, float(h)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        t = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator) * (1.0 - 2 * self.h)
        x_t = self.path.sample(x_1, t, ctx.generator).x_t
        p1, x_mid, p2 = teacher_two_steps(self.teacher, self.path, x_t, t, self.h, ctx.generator)
        a1, a2 = unmask_probs(self.path, t, self.h)
        q = two_step_target(p1, p2, x_mid, a1, a2, self.path.source.mask_id, self.cfg.target)
        return distill_loss(ctx.model(x_t, t), q, self.path.source.movable(x_t), self.cfg.loss)
