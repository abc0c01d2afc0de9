"""The per-step updates of the training-free mask-source samplers: confidence-ordered unmasking (LLaDA/Dream
`low_confidence` remasking), threshold parallel decoding (Fast-dLLM) and ReMDM remasking. Each works on one block of
positions (the whole sequence unless semi-AR blocks are on) and on probabilities p already processed by the knobs
(temperature, top-p, greedy; fsdfm.sampling.knobs).

Confidence-ordered step (k positions revealed): draw x^_i ~ p_i at every masked position (float64 inverse CDF: one
uniform per position), score each position from p alone (never from the draw's noise: the known bug elsewhere is to
rank by logits + Gumbel noise),

    confidence  s_i = p_i(x^_i)     top_prob  s_i = max_v p_i(v)     margin  s_i = p_i(1st) - p_i(2nd)
    entropy     s_i = sum_v p_i(v) log p_i(v)

Only `confidence` depends on the draw: choosing positions by the probability of what was drawn there favours likely
draws, so even the exact denoiser at budget L samples a sharper law than the data's (LLaDA's low_confidence at T > 0;
at T = 0 it is top_prob). The other scores are functions of p alone: one position per step chosen by them, then
drawn from its exact conditional, is an exact chain-rule sampler (tests/test_sampling.py checks both facts).

and reveal the k masked positions of largest s_i with their x^_i. Ties (knob `ties`): "left" gives them to the
leftmost position (torch.topk's usual order, the default), "random" orders tied positions by a uniform random key
(one extra float64 uniform per position, drawn after x^): under an exact denoiser every position's score ties at
the first step, and leftmost ties then reveal a contiguous, maximally dependent block.

Threshold step: k = max(#{masked i : p_i(x^_i) > tau}, ceil(masked / steps left)), so at least one position per
step and never more steps than the budget; tau = 1 leaves only the budget's share (one per step at budget L).

ReMDM step t -> s (revealed fractions a_t = kappa(t) <= a_s, remasking probability sigma):
    a decoded token is remasked w.p. sigma; a masked one is revealed w.p. (a_s - (1 - sigma) a_t) / (1 - a_t),
    with x^ ~ p; schedules: cap sigma = min(eta, (1 - a_s) / a_t), rescale sigma = eta min(1, (1 - a_s) / a_t),
    loop: a held at alpha_on inside the window, sigma = min(eta, (1 - a_s) / a_t) there and 0 outside.
"""

from __future__ import annotations

import torch

from fsdfm.sampling.knobs import SamplerKnobs


SCORE_GRID = 2.0**36


def draw_inverse_cdf(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """x ~ p per row of p (..., V) by inverse CDF with one float64 uniform per row: min{k : c_k > u c_V}."""
    c = p.to(torch.float64).cumsum(-1)
    u = torch.rand(p.shape[:-1], dtype=torch.float64, device=p.device, generator=generator)
    target = u * c[..., -1]
    x = (c <= target[..., None]).sum(-1)
    # rounding can put the target past the last positive weight: take the last token of positive mass
    last = ((p > 0) * torch.arange(1, p.shape[-1] + 1, device=p.device)).amax(-1) - 1
    return torch.minimum(x, last)


def scores(p: torch.Tensor, x_hat: torch.Tensor, score: str) -> torch.Tensor:
    """The unmasking order's score per position from p (B, L, V) and the drawn tokens x_hat (B, L): (B, L) float64.
    Noise-free: it reads p only (x_hat picks which p(v) is the confidence)."""
    if score == "confidence":
        return p.gather(-1, x_hat[..., None]).squeeze(-1)
    if score == "top_prob":
        return p.amax(-1)
    if score == "margin":
        top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
        return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)
    if score == "entropy":
        return torch.where(p > 0, p * torch.log(p), torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
    raise ValueError(f"unknown score {score!r}")


def reveal_top(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    s: torch.Tensor,
    masked: torch.Tensor,
    k: torch.Tensor,
    ties: str = "left",
    generator: torch.Generator | None = None,
):
    """Reveal the k (B,) masked positions of largest score s (B, L) per row with x_hat; ties go to the leftmost
    (ties="left") or are ordered by a uniform random key drawn from `generator` (ties="random").

    Scores are compared on a grid of 2^-36: positions whose scores are equal in exact arithmetic (e.g. every
    position's marginal is the same stationary law at the first step) but differ in the last bits of the
    denoiser's arithmetic tie, so the order does not depend on rounding noise (nor on the device)."""
    s = torch.round(s.to(torch.float64) * SCORE_GRID) / SCORE_GRID
    s = torch.where(masked, s, torch.full((), -float("inf"), dtype=torch.float64, device=s.device))
    if ties == "random":
        # a random permutation first, then a stable sort by score: equal scores keep the permutation's order
        perm = torch.argsort(torch.rand(s.shape, dtype=torch.float64, device=s.device, generator=generator), dim=-1)
        order = perm.gather(-1, torch.argsort(s.gather(-1, perm), dim=-1, descending=True, stable=True))
    elif ties == "left":
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
    else:
        raise ValueError(f"ties must be 'left' or 'random', got {ties!r}")
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    reveal = masked & (rank < k[:, None])
    return torch.where(reveal, x_hat, x)


def uniform_counts(n_masked: int, n_steps: int) -> list[int]:
    """LLaDA's reveal schedule: n_masked positions over n_steps steps, n // s each, the remainder to the first."""
    base, rem = divmod(n_masked, n_steps)
    return [base + (1 if i < rem else 0) for i in range(n_steps)]


def confidence_step(x, p, mask_id, k, score, generator, p_score=None, ties="left"):
    """One confidence-ordered step on a block. x: (B, Lb) long; p: (B, Lb, V) float64, the law drawn from (after
    temperature / top-p); p_score: the model's own p the scores read (as LLaDA: softmax of the raw logits; default
    p); k: (B,) long counts."""
    masked = x == mask_id
    x_hat = draw_inverse_cdf(p, generator)
    return reveal_top(x, x_hat, scores(p if p_score is None else p_score, x_hat, score), masked, k, ties, generator)


def threshold_step(x, p, mask_id, tau, steps_left, generator, p_score=None, ties="left"):
    """One threshold step: reveal every masked position with p(x^) > tau, at least ceil(masked / steps_left)."""
    masked = x == mask_id
    x_hat = draw_inverse_cdf(p, generator)
    conf = scores(p if p_score is None else p_score, x_hat, "confidence")
    n_masked = masked.sum(-1)
    k = torch.maximum((masked & (conf > tau)).sum(-1), -(-n_masked // steps_left))
    return reveal_top(x, x_hat, conf, masked, k, ties, generator)


def remdm_sigma(a_t: torch.Tensor, a_s: torch.Tensor, knobs: SamplerKnobs, in_loop: torch.Tensor) -> torch.Tensor:
    """ReMDM's remasking probability sigma for a step with revealed fractions a_t -> a_s (tensors of one shape)."""
    eta = knobs.remask_eta
    sigma_max = torch.where(a_t > 0, (1.0 - a_s) / a_t.clamp_min(1e-300), torch.zeros_like(a_t)).clamp(max=1.0)
    if knobs.remask == "cap":
        return sigma_max.clamp(max=eta)
    if knobs.remask == "rescale":
        return eta * sigma_max
    return torch.where(in_loop, sigma_max.clamp(max=eta), torch.zeros_like(a_t))


def loop_fraction(t: torch.Tensor, knobs: SamplerKnobs, kappa) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMDM-loop's revealed fraction at our time t in [0, 1] (noise at 0), and whether t is inside the loop window.

    In our time the window is [1 - t_on, 1 - t_off]; before it the path's kappa is rescaled to reach alpha_on at its
    start, inside it a = alpha_on, after it a rises linearly in kappa from alpha_on to 1."""
    t0, t1 = 1.0 - knobs.t_on, 1.0 - knobs.t_off
    a_on = knobs.alpha_on
    before = kappa(torch.clamp(t / t0, max=1.0)) * a_on if t0 > 0 else torch.full_like(t, a_on)
    after = a_on + (1.0 - a_on) * kappa(torch.clamp((t - t1) / max(1.0 - t1, 1e-300), min=0.0, max=1.0))
    a = torch.where(t <= t0, before, torch.where(t < t1, torch.full_like(t, a_on), after))
    return a, (t >= t0) & (t < t1)


def remdm_step(x, p, mask_id, a_t, a_s, sigma, final, generator):
    """One ReMDM step on a block. x: (B, Lb); p: (B, Lb, V) float64; a_t, a_s, sigma: (B,) float64; final: bool.
    Draw order (fixed): the reveal uniforms, the destinations, then the remask uniforms (only when sigma > 0)."""
    masked = x == mask_id
    B, Lb = x.shape
    u = torch.rand((B, Lb), dtype=torch.float64, device=x.device, generator=generator)
    if final:
        reveal_prob = torch.ones_like(a_t)
    else:
        reveal_prob = ((a_s - (1.0 - sigma) * a_t) / (1.0 - a_t).clamp_min(1e-300)).clamp(0.0, 1.0)
    x_hat = draw_inverse_cdf(p, generator)
    x_new = torch.where(masked & (u < reveal_prob[:, None]), x_hat, x)
    if not final and bool((sigma > 0).any()):
        v = torch.rand((B, Lb), dtype=torch.float64, device=x.device, generator=generator)
        x_new = torch.where(~masked & (v < sigma[:, None]), torch.full_like(x, mask_id), x_new)
    return x_new
