"""One sampling loop for the mixture path, with pluggable per-step update rules.

At step i the model gives p = p_{1|t}(. | x_t) (float64 by default). A position holding z that may
still move (see `Source.movable`) jumps with a rule-specific probability, and its destination is drawn
proportional to p(x) over x != z. Deciding the jump from p(z) first and drawing destinations only where
a jump happens keeps the sampler's own cost small on CPU. The last step draws x_1 ~ p directly at
every movable position.

Update rules (jump probability of a position holding z, step t -> t + h):
    euler              (1 - p(z)) * (1 - exp(-h g(t)))        the DFM baseline: draw x^_1 ~ p, move w.p. 1 - e^{-h g}
    cumulative_scalar  1 - r^(1 - p(z)),  r = (1 - kappa(t + h)) / (1 - kappa(t))      FS-DFM; never overshoots
    mixture_euler      1 - exp(-(1 - p(z)))                   independent of t and h (ablation)
For a masked token (p(z) = 0) the cumulative-scalar probability is (kappa(t+h) - kappa(t)) / (1 - kappa(t)),
exactly the path's unmasking probability.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fsdfm.paths import MixturePath
from fsdfm.registry import Registry
from fsdfm.schedulers import Scheduler

UPDATE_RULES: Registry = Registry("update rule")
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Scheduler], torch.Tensor]


@dataclass(frozen=True)
class SampleOutput:
    """tokens: (N, L) long; nfe: network evaluations per sample; time_grid: (steps + 1,) float64;
    wall_s: sampling wall-clock (CUDA synchronised, warm-up excluded by the caller)."""

    tokens: torch.Tensor
    nfe: int
    time_grid: torch.Tensor
    wall_s: float = 0.0


@UPDATE_RULES.register("euler")
def euler_jump_prob(p_z, t, h, scheduler):
    """(1 - p(z)) (1 - exp(-h g(t))). p_z: (B, L); t, h: (B,) -> (B, L)."""
    g = scheduler(t).rate
    return (1.0 - p_z) * (1.0 - torch.exp(-h * g))[:, None]


@UPDATE_RULES.register("cumulative_scalar")
def cumulative_scalar_jump_prob(p_z, t, h, scheduler):
    """1 - r^(1 - p(z)) with r = (1 - kappa(t + h)) / (1 - kappa(t)) in [0, 1]."""
    r = scheduler.survival_ratio(t, h)[:, None]
    return 1.0 - r ** (1.0 - p_z)


@UPDATE_RULES.register("mixture_euler")
def mixture_euler_jump_prob(p_z, t, h, scheduler):
    """1 - exp(-(1 - p(z))), independent of t and h."""
    return 1.0 - torch.exp(-(1.0 - p_z))


# MDLM-style sampling is the mask-source DFM with the cumulative-scalar (exact ancestral) rule.
UPDATE_ALIASES = {"mdlm": "cumulative_scalar"}


def get_rule(name: str) -> Rule:
    return UPDATE_RULES.get(UPDATE_ALIASES.get(name, name))


def time_grid(n_steps: int, t_start: float = 0.0, t_end: float = 1.0, device=None) -> torch.Tensor:
    """Uniform grid t_i = t_start + i (t_end - t_start) / n_steps, i = 0..n_steps (float64)."""
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64, device=device)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Categorical draw per row of probs (..., V) by Gumbel-max in probs' dtype (no host sync)."""
    u = torch.rand(probs.shape, dtype=probs.dtype, device=probs.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(probs.dtype).tiny)))
    return torch.argmax(torch.log(probs) + gumbel, dim=-1)


def update(x: torch.Tensor, p: torch.Tensor, t: torch.Tensor, h: torch.Tensor, rule: Rule, path: MixturePath,
           generator: torch.Generator | None, final: torch.Tensor | bool = False, sparse: bool | None = None) -> torch.Tensor:
    """One step of the sampler: x (B, L) at time t -> x at t + h.

    p: (B, L, V) probabilities p_{1|t}; t, h: (B,); final: bool or (B,) bool — rows whose step ends the
    trajectory draw x_1 ~ p at every movable position. sparse: draw destinations only at jumping
    positions (default on CPU, where the boolean gather costs no host-device synchronisation).
    """
    B, L, V = p.shape
    final = torch.as_tensor(final, device=x.device).expand(B)
    movable = path.source.movable(x)
    in_vocab = x < V
    z = x.clamp(max=V - 1)
    p_at_z = p.gather(-1, z[..., None]).squeeze(-1)  # at a mask position: p(V - 1), the clamped index
    p_z = p_at_z * in_vocab
    prob = torch.where(final[:, None], torch.ones_like(p_z), rule(p_z, t, h, path.scheduler))
    u = torch.rand((B, L), dtype=p.dtype, device=x.device, generator=generator)
    jump = movable & (u < prob)
    # Destinations: p with the current token removed (a non-final move must change the token).
    drop_z = (in_vocab & ~final[:, None])
    if sparse is None:
        sparse = x.device.type == "cpu"
    if sparse:
        idx = jump.nonzero(as_tuple=True)
        q = p[idx]
        q[torch.arange(q.shape[0], device=q.device), z[idx]] *= (~drop_z[idx]).to(q.dtype)
        x = x.clone()
        x[idx] = _draw(q, generator)
        return x
    # Write back p_at_z, not p_z: at a mask position z is the clamped V - 1 and its mass must stay.
    q = p.scatter(-1, z[..., None], torch.where(drop_z, 0.0, p_at_z)[..., None].to(p.dtype))
    q = torch.where(q.sum(-1, keepdim=True) > 0, q, p)  # rows with p(z) = 1 never jump; keep them valid
    return torch.where(jump, _draw(q, generator), x)


@torch.no_grad()
def sample(model: Callable, path: MixturePath, *, n_samples: int, seq_len: int, n_steps: int | None = None,
           grid: torch.Tensor | None = None, rule: str = "cumulative_scalar", h_conditioned: bool = False,
           generator: torch.Generator | None = None, precision: torch.dtype = torch.float64, batch_size: int | None = None,
           device: torch.device | str = "cpu", x_init: torch.Tensor | None = None, autocast: bool = False,
           sparse: bool | None = None) -> SampleOutput:
    """Sample n_samples sequences of length seq_len on a time grid (a uniform grid of n_steps on [0, 1],
    or an explicit `grid` of increasing times). `model(x_t, t, h)` returns logits (B, L, V); h is passed
    only when `h_conditioned` (the FS-DFM student is told the step size at every step).

    x_init: (n_samples, L) start state at grid[0] (default: a draw from the source at t = grid[0] = 0).
    """
    device = torch.device(device)
    grid = time_grid(n_steps, device=device) if grid is None else grid.to(device=device, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("time grid must be a 1-D increasing tensor with at least 2 points")
    rule_fn = get_rule(rule)
    batch_size = batch_size or n_samples
    n_total = grid.numel() - 1
    chunks, wall = [], 0.0
    for start in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - start)
        if x_init is not None:
            x = x_init[start:start + B].to(device)
        else:
            x = path.source.sample((B, seq_len), generator=generator, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(n_total):
            t, h = grid[i].expand(B), (grid[i + 1] - grid[i]).expand(B)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x, t.float(), h.float() if h_conditioned else None)
            p = torch.softmax(logits.to(precision), dim=-1)
            x = update(x, p, t, h, rule_fn, path, generator, final=(i == n_total - 1), sparse=sparse)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        chunks.append(x)
    return SampleOutput(tokens=torch.cat(chunks).cpu(), nfe=n_total, time_grid=grid.cpu(), wall_s=wall)
