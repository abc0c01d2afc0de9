"""The per-step chain-rule split at the study's scale: mask path, any sequence length the exact posterior handles.

`fsdfm.oracle_law.step_split` enumerates the exact step law J(y | x_t) over A^L states, so it stops at ~10^6 of
them. Under the mask source J has a closed form that needs no enumeration. From x_t at time t, a step to t + h
reveals each masked position independently given x_1 (probability 1 - r, r = (1 - kappa(t + h)) / (1 - kappa(t)),
r = 0 on the last step), so for a y that agrees with x_t where x_t is observed,

    J(y | x_t)  = (1 - r)^{n_rev} r^{n_mask} P_src(obs(y)) / P_src(obs(x_t)),
    J_i(y^i)    = (1 - r) p_{1|t}(y^i | x_t)  (y^i a token),   r  (y^i the mask),   1[y^i = x_t^i]  (observed i),

with obs(x) the event "x_1 agrees with x at its observed positions", whose probability is the forward pass's
normaliser (`fsdfm.oracle_posterior.Posterior.log_evidence`: exact under the mask source, whose evidence factors
are 0 or 1), and p_{1|t} the exact marginals of the same forward-backward. The powers of r cancel in the total
correlation's integrand,

    TC(J) = E_{y ~ J} [ log P_src(obs(y)) - log P_src(obs(x_t)) - sum_{i revealed in y} log p_{1|t}(y^i | x_t) ],

estimated by Monte Carlo with exact integrands: y is drawn as x_1 ~ p(x_1 | x_t) jointly (forward filtering,
backward sampling, `fsdfm.oracle_joint`), then each masked position revealed with probability 1 - r. The
per-position term sum_i KL(J_i || Q_i), Q_i the sampler's product kernel (`fsdfm.oracle_law.product_kernel`) with
the model's p_{1|t}, is exact. Their sum is KL(J || prod_i Q_i) (the identity of `fsdfm.oracle_law`).

Boundary: one step at given states; the states, the grid and the records are the caller's (`fsdfm.methods.
path_split`). The uniform source has no such closed form (every position keeps moving): it is split on tiny
sources by enumeration (`fsdfm.oracle_law`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fsdfm.data.oracle import OracleSource
from fsdfm.oracle_joint import joint_posterior_sample
from fsdfm.oracle_law import product_kernel
from fsdfm.oracle_posterior import posterior
from fsdfm.paths import MixturePath

__all__ = ["MaskStepSplit", "mask_step_split"]


@dataclass(frozen=True)
class MaskStepSplit:
    """One step's split at B states, nats per sequence, each (B,): path_kl = tc + per_position (KL(J || prod_i Q_i)),
    tc the Monte-Carlo mean of the total correlation over `draws` draws of y ~ J and tc_se its standard error."""

    path_kl: torch.Tensor
    tc: torch.Tensor
    tc_se: torch.Tensor
    per_position: torch.Tensor


def _kl_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last two axes of a log(a / b) (0 log 0 = 0; inf where a > 0 = b): (B, L, A) -> (B,)."""
    on = a > 0
    terms = torch.where(on, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a))
    out = terms.sum((-1, -2))
    return torch.where((on & (b <= 0)).any(-1).any(-1), torch.full_like(out, math.inf), out)


@torch.no_grad()
def mask_step_split(
    model: Callable,
    oracle: OracleSource,
    path: MixturePath,
    x_t: torch.Tensor,
    t: float,
    h: float,
    rule: str,
    h_conditioned: bool = False,
    draws: int = 16,
    generator: torch.Generator | None = None,
) -> MaskStepSplit:
    """KL(J || prod_i Q_i) = TC(J) + sum_i KL(J_i || Q_i) at each row of x_t for the step t -> t + h (module docstring).

    Args:
        model: model(x_t, t, h) -> logits (B, L, V), the sampler's denoiser (an `ExactPosterior` gives the exact one).
        oracle: the source (MarkovSource of any order or HMMSource).  path: a mask-source mixture path.
        x_t: (B, L) long states (mask id V).  t, h: the step.  rule: a name of `fsdfm.samplers.UPDATE_RULES`.
        h_conditioned: pass h to the model.  draws: Monte-Carlo draws of y ~ J per row (>= 2: a standard error).
        generator: the draws' generator.
    Returns:
        MaskStepSplit with (B,) float64 tensors, nats per sequence.
    """
    if path.source.name != "mask":
        raise ValueError(f"mask_step_split needs the mask source (closed-form J); got {path.source.name!r}")
    if draws < 2:
        raise ValueError(f"draws must be >= 2 (the total correlation's standard error needs two), got {draws}")
    B, L = x_t.shape
    V = path.vocab_size
    final = t + h >= 1.0 - 1e-12
    tt = torch.full((B,), float(t), dtype=torch.float64)
    kappa = path.scheduler.kappa(tt)
    post = posterior(oracle, x_t, kappa, "mask")
    r = 0.0 if final else float(path.scheduler.survival_ratio(tt[:1], torch.full((1,), float(h)).double()))
    masked = x_t == V
    # the exact step's marginals J_i over A = V + 1 symbols
    J = torch.nn.functional.one_hot(x_t, V + 1).to(torch.float64)
    moving = torch.cat([(1.0 - r) * post.probs, torch.full((B, L, 1), r, dtype=torch.float64)], -1)
    J = torch.where(masked[..., None], moving, J)
    logits = model(x_t, tt.float(), torch.full((B,), float(h)) if h_conditioned else None)
    Q = product_kernel(x_t, torch.softmax(logits.to(torch.float64), -1), t, h, rule, path, final)
    per_position = _kl_rows(J, Q)
    log_p1t = post.probs.clamp_min(1e-300).log()
    # all draws in one batch (draws * B rows, draw-major): one FFBS and one forward-backward pass, not `draws` of them
    x_rep, kappa_rep = x_t.repeat(draws, 1), kappa.repeat(draws)
    x_1 = joint_posterior_sample(oracle, x_rep, kappa_rep, "mask", generator)
    u = torch.rand((draws * B, L), dtype=torch.float64, generator=generator)
    revealed = (x_rep == V) & (u >= r)
    y = torch.where(revealed, x_1, x_rep)
    log_obs_y = posterior(oracle, y, kappa_rep, "mask").log_evidence  # kappa does not enter the mask evidence
    marg = (log_p1t.repeat(draws, 1, 1).gather(-1, x_1[..., None]).squeeze(-1) * revealed).sum(-1)
    tc_draws = (log_obs_y - post.log_evidence.repeat(draws) - marg).view(draws, B)
    tc = tc_draws.mean(0)
    return MaskStepSplit(
        path_kl=tc + per_position,
        tc=tc,
        tc_se=tc_draws.std(0, unbiased=True) / math.sqrt(draws),
        per_position=per_position,
    )
