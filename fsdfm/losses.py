"""Training losses of the DFM teacher and the FS-DFM student.

All take logits (B, L, V) over the V data tokens and return a scalar. A per-position `weight` (B, L)
restricts the loss to positions that matter (for the mask source: the masked ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdfm.registry import Registry

DFM_LOSSES: Registry = Registry("DFM loss")


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Sum of weighted per-position losses over the number of positions that carry weight."""
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, x_1: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i -log p_{1|t}(x_1[i] | x_t) over weighted positions."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), x_1.flatten(), reduction="none").view_as(x_1)
    return _weighted_mean(ce, weight)


def generalized_kl_per_position(
    logits: torch.Tensor, x_1: torch.Tensor, x_t: torch.Tensor, rate: torch.Tensor
) -> torch.Tensor:
    """The generalized-KL loss of the mixture path, per position (B, L):

        -g(t) [ p_{1|t}(x_t) - 1{x_t = x_1} + (1 - 1{x_t = x_1}) log p_{1|t}(x_1) ]

    rate: (B,) the weight g(t) (or G/h for the FS-DFM anchor rows). A mask token (id >= V) has p(x_t) = 0.
    """
    V = logits.shape[-1]
    log_p = F.log_softmax(logits.float(), dim=-1)
    in_vocab = x_t < V
    p_xt = log_p.gather(-1, x_t.clamp(max=V - 1)[..., None]).squeeze(-1).exp() * in_vocab
    log_p_x1 = log_p.gather(-1, x_1[..., None]).squeeze(-1)
    same = (x_t == x_1).to(log_p.dtype)
    return -rate.to(log_p.dtype)[:, None] * (p_xt - same + (1.0 - same) * log_p_x1)


def generalized_kl(logits, x_1, x_t, rate, weight=None) -> torch.Tensor:
    """Mean over positions of `generalized_kl_per_position` (the weight only selects positions)."""
    return _weighted_mean(generalized_kl_per_position(logits, x_1, x_t, rate), weight)


def distill_kl_per_position(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(target || student) per position (B, L) = sum_x p_T(x) [log p_T(x) - log p_S(x)]."""
    log_q = F.log_softmax(target_logits.float(), dim=-1)
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def distill_kl(student_logits, target_logits, weight=None) -> torch.Tensor:
    return _weighted_mean(distill_kl_per_position(student_logits, target_logits), weight)


# The DFM teacher's loss by name: fn(logits, path_sample, rate, weight) -> scalar.
DFM_LOSSES.register("ce", lambda logits, ps, rate, weight: cross_entropy(logits, ps.x_1, weight))
DFM_LOSSES.register("gkl", lambda logits, ps, rate, weight: generalized_kl(logits, ps.x_1, ps.x_t, rate, weight))
