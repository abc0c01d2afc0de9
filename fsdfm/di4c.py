"""Di4C (Hayakawa et al. 2024, arXiv 2410.08709): a mixture student that removes the factorization error of a
few-step product sampler, distilled from a mask-source teacher on top of SDTT's rounds (fsdfm.sdtt).

The student is a DiT fed a latent lambda (through its scalar h input, whose fresh embedding starts at zero so the
student starts as its teacher); one step of size 2h from x_t has the joint

    p_theta(x_{t+2h} | x_t) = E_lambda prod_i p_theta,i(x_{t+2h,i} | x_t, t, lambda)      (a mixture of products)

(each masked position stays masked w.p. r_2 or unmasks to v w.p. (1 - r_2) p_theta,i(v | lambda); r_2 does not
depend on lambda). lambda ~ U[0, 1] (`components` 0, the paper's continuous latent) or uniform over
{(k + 1/2) / K} (`components` K); with K = 1 the student is a product model (tests/test_di4c.py: bit for bit).

Losses (per training row, two frozen-teacher steps of size h from x_t: x_mid, x_end):
- distillation: each lambda's marginals match the teacher's two-step per-position marginals, KL(q || p_theta(. |
  lambda)) with q SDTT's one-trajectory target (fsdfm.sdtt.two_step_target, unbiased);
- consistency: the joint mixture log-likelihood of the teacher's two-step sample at the positions it unmasked,
  -log (1/S) sum_s prod_{i unmasked} p_theta,i(x_end,i | x_t, t, lambda_s)  (S = `lambda_samples` draws of lambda),
  whose minimiser is the teacher's two-step joint, correlations included (a product model cannot reach it).
Deviation: the paper's consistency loss composes the student with the teacher over intermediate times and uses
importance weights between their densities; ours is the direct joint likelihood of teacher trajectories (a
simpler estimator of the same target joint) and is built on SDTT's rounds rather than on a fixed teacher.

Sampling draws lambda once per step per sequence (`LambdaModel`); a lambda forward is one network evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fsdfm.paths import MixturePath
from fsdfm.samplers import get_rule, update
from fsdfm.sdtt import SDTTConfig, distill_loss, teacher_two_steps, two_step_target, unmask_probs
from fsdfm.train import StepContext


@dataclass(frozen=True)
class Di4CConfig(SDTTConfig):
    """SDTT's rounds and target plus: components (0: lambda ~ U[0, 1]; K: uniform over K fixed values),
    lambda_samples (S, the Monte Carlo draws of the consistency loss) and the two loss weights."""

    components: int = 0
    lambda_samples: int = 4
    distill_weight: float = 1.0
    consistency_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.components, int) and self.components >= 0):
            raise ValueError(f"components must be an integer >= 0, got {self.components!r}")
        if not (isinstance(self.lambda_samples, int) and self.lambda_samples >= 1):
            raise ValueError(f"lambda_samples must be a positive integer, got {self.lambda_samples!r}")


def draw_lambda(n: int, components: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """n latents: U[0, 1] (components 0) or uniform over {(k + 1/2) / K}; with K = 1 the constant 1/2 and no
    draw (so a one-component student consumes no randomness: it samples as the product student)."""
    if components == 1:
        return torch.full((n,), 0.5, device=device)
    if components == 0:
        return torch.rand(n, device=device, generator=generator)
    k = torch.randint(components, (n,), device=device, generator=generator)
    return (k.float() + 0.5) / components


class LambdaModel(nn.Module):
    """model(x, t, lambda) behind the sampler's model(x, t, h) interface: a fresh lambda per row at every call."""

    def __init__(self, model, components: int, generator: torch.Generator | None):
        super().__init__()
        self.model, self.components, self.generator = model, components, generator

    def forward(self, x, t, h=None):
        lam = draw_lambda(x.shape[0], self.components, self.generator, x.device)
        return self.model(x, t, lam)


def mixture_nll(logp_rows: torch.Tensor) -> torch.Tensor:
    """-log (1/S) sum_s exp(logp_rows[s]): the mixture's negative log-likelihood. logp_rows (S, B) -> (B,)."""
    s = logp_rows.shape[0]
    return -(torch.logsumexp(logp_rows, 0) - torch.log(torch.tensor(float(s), dtype=logp_rows.dtype)))


class Di4CObjective:
    """One Di4C round at teacher step h (module docstring). Two teacher forwards and S student forwards a row."""

    TEACHER_NFE = 2

    def __init__(self, teacher, path: MixturePath, cfg: Di4CConfig, h: float):
        if path.source.name != "mask":
            raise ValueError(f"Di4C here distils a mask-source teacher, got source {path.source.name!r}")
        self.teacher, self.path, self.cfg, self.h = teacher, path, cfg, float(h)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1, g, cfg = ctx.batch, ctx.generator, self.cfg
        B = x_1.shape[0]
        t = torch.rand(B, device=x_1.device, generator=g) * (1.0 - 2 * self.h)
        x_t = self.path.sample(x_1, t, g).x_t
        p1, x_mid, p2 = teacher_two_steps(self.teacher, self.path, x_t, t, self.h, g)
        a1, a2 = unmask_probs(self.path, t, self.h)
        mask_id = self.path.source.mask_id
        q = two_step_target(p1, p2, x_mid, a1, a2, mask_id, cfg.target)
        # the teacher's second step draws x_end from p2 at the positions it unmasks (the sample of the joint)
        x_end = teacher_end(x_mid, p2, t + self.h, self.h, self.path, g)
        moved = (x_t == mask_id) & (x_end != mask_id)
        S = cfg.lambda_samples
        lam = draw_lambda(S * B, cfg.components, g, x_1.device)
        logits = ctx.model(x_t.repeat(S, 1), t.repeat(S), lam)  # (S B, L, V)
        distil = distill_loss(logits, q.repeat(S, 1, 1), (x_t == mask_id).repeat(S, 1), "kl")
        logp = torch.log_softmax(logits.double(), -1).gather(-1, x_end.clamp(max=mask_id - 1).repeat(S, 1)[..., None])
        logp_rows = (logp.squeeze(-1) * moved.repeat(S, 1)).sum(-1).view(S, B)
        consistency = mixture_nll(logp_rows).sum() / moved.sum().clamp_min(1)
        return cfg.distill_weight * distil + cfg.consistency_weight * consistency.float()


@torch.no_grad()
def teacher_end(x_mid, p2, t_mid, h, path: MixturePath, generator):
    """The teacher's second step from x_mid with its probabilities p2 (cumulative-scalar rule)."""
    hh = torch.full_like(t_mid, h, dtype=torch.float64)
    return update(x_mid, p2, t_mid.double(), hh, get_rule("cumulative_scalar"), path, generator)
