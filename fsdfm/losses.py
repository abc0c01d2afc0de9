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


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden W^T + b) at chosen indices, by row chunks: never more than (chunk, V) logits alive."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, chunk):
        out = torch.empty(index.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s : s + chunk], weight, bias).float()  # (c, V) in fp32, one chunk at a time
            lse[s : s + chunk] = torch.logsumexp(logits, -1)
            out[s : s + chunk] = logits.gather(-1, index[s : s + chunk]) - lse[s : s + chunk, None]
        ctx.save_for_backward(hidden, weight, bias, index, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, index, lse = ctx.saved_tensors
        gh = torch.empty_like(hidden)
        gw = torch.zeros_like(weight, dtype=torch.float32)
        gb = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        grad_out = grad_out.float()
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            logits = F.linear(h, weight, bias).float()
            g_k = grad_out[s : s + ctx.chunk]  # (c, k)
            # d/dl of sum_k g_k (l_{i_k} - lse) = scatter(g) - softmax(l) sum_k g_k
            g = torch.exp(logits - lse[s : s + ctx.chunk, None]).mul_(-g_k.sum(-1, keepdim=True))
            g.scatter_add_(-1, index[s : s + ctx.chunk], g_k)
            gh[s : s + ctx.chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            gw += g.t() @ h.float()
            if gb is not None:
                gb += g.sum(0)
        return gh, gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None, None


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """log p(index) under p = softmax(hidden W^T + b) in fp32, computed (and differentiated) by chunks of rows so
    that the fp32 (N, V) logits are never materialised: ~chunk x V floats alive instead of N x V (at V = 50,257,
    N = 16 x 1,024: 3.3 GB -> 0.2 GB). Gradients flow to hidden, weight and bias.

    The output head's part of the losses above: cross-entropy is -linear_log_probs(h, W, b, x_1[:, None]); the
    generalized KL needs log p at x_t and x_1 (index (N, 2)). Not yet used by the objectives, whose models return
    logits (wiring it needs the DiT's hidden states before its head, and changes results at the rounding level).

    Args: hidden (N, d); weight (V, d); bias (V,) or None; index (N, k) long in [0, V); chunk: rows per chunk.
    Returns: (N, k) float32 log-probabilities."""
    if index.ndim != 2 or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_log_probs: index must be (N, k) with N = {hidden.shape[0]}, got {tuple(index.shape)}")
    return _LinearLogProbs.apply(hidden, weight, bias, index, max(1, int(chunk)))
