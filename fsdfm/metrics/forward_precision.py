"""Is a bf16 forward safe for sampling? The effect of the network's forward precision on the token distribution,
against the sampling noise of a study (sampling.forward_precision; issue 28).

On the states of a float32 sampling run (fixed seed), the network is evaluated twice, in float32 and under bf16
autocast; at every state and position the two predicted distributions p = softmax(l_fp32), q = softmax(l_bf16)
(in float64) are compared by their total variation

    TV(p, q) = 1/2 sum_v |p_v - q_v|      (<= (max_v d_v - min_v d_v) / 4 with d = l_bf16 - l_fp32)

and set against the sampling noise of a study drawing n samples: the expected TV between p and the empirical
distribution of n draws from it, by the normal approximation of each count (E|N(0, s^2)| = s sqrt(2 / pi)):

    noise_n(p) = 1/2 sum_v sqrt(2 p_v (1 - p_v) / (pi n))

bf16 is called safe when the largest TV over all states and positions stays below the mean noise at the study's
n -- a difference no metric computed from n samples can resolve. Every position counts, also those a mask-source
sampler has already unmasked (conservative). The same run drawn again with a bf16 forward from the same seed also
gives the share of identical tokens (the two runs are coupled by the seed: a descriptive figure, not the test).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fsdfm.paths import MixturePath
from fsdfm.samplers import sample


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum_v |p_v - q_v| over the last axis. Args: p, q (..., V). Returns (...)."""
    return 0.5 * (p - q).abs().sum(-1)


def sampling_noise_tv(p: torch.Tensor, n: int) -> torch.Tensor:
    """Expected TV between p and the empirical distribution of n draws from it (normal approximation):
    1/2 sum_v sqrt(2 p_v (1 - p_v) / (pi n)). Args: p (..., V); n >= 1. Returns (...)."""
    return 0.5 * math.sqrt(2.0 / (math.pi * n)) * (p * (1 - p)).clamp_min(0).sqrt().sum(-1)


@torch.no_grad()
def forward_tv(model: Callable, x: torch.Tensor, t: torch.Tensor, h, dtype: torch.dtype = torch.bfloat16):
    """Per-position TV between the float32 forward's distribution and the `dtype`-autocast forward's, and the
    float32 distribution p itself. Args: x (B, L) tokens, t (B,) times, h (B,) step sizes or None.
    Returns (tv (B, L), p (B, L, V) float64)."""
    device = x.device
    p = torch.softmax(model(x, t, h).double(), -1)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        q = torch.softmax(model(x, t, h).double(), -1)
    return total_variation(p, q), p


@dataclass(frozen=True)
class ForwardPrecisionCheck:
    """dtype: the forward compared with float32; n_states: network calls compared (one per step); max_tv, mean_tv:
    over all states and positions; noise_tv: mean sampling-noise TV at n_samples; safe: max_tv < noise_tv;
    same_tokens: share of tokens equal in the float32 and `dtype` runs from one seed."""

    dtype: str
    n_samples: int
    n_states: int
    max_tv: float
    mean_tv: float
    noise_tv: float
    safe: bool
    same_tokens: float

    def to_dict(self) -> dict:
        return asdict(self)


class _StateRecorder:
    """The model, recording the inputs of every call (the sampler's states on its float32 trajectory)."""

    def __init__(self, model: Callable):
        self.model, self.states = model, []

    def __call__(self, x, t, h=None):
        self.states.append((x.clone(), t.clone(), None if h is None else h.clone()))
        return self.model(x, t, h)


@torch.no_grad()
def check_forward_precision(
    model: Callable,
    path: MixturePath,
    *,
    n_samples: int,
    seq_len: int,
    n_steps: int,
    rule: str = "cumulative_scalar",
    h_conditioned: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> ForwardPrecisionCheck:
    """Compare the `dtype`-autocast forward with the float32 one on the states of a float32 sampling run of
    n_samples sequences (n_steps steps of `rule`, seed `seed`), against the sampling noise of n_samples draws.

    Args: model(x (B, L), t (B,), h (B,) | None) -> logits (B, L, V); path: the method's mixture path.
    Returns: ForwardPrecisionCheck (safe: the largest TV below the mean sampling noise)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"check_forward_precision: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    device = torch.device(device)
    kw = dict(n_samples=n_samples, seq_len=seq_len, n_steps=n_steps, rule=rule, h_conditioned=h_conditioned)
    recorder = _StateRecorder(model)
    ref = sample(recorder, path, generator=torch.Generator(device).manual_seed(seed), device=device, **kw)
    low = sample(  # the sampler's own bf16 path (sample(autocast=True)), the one a bf16 study runs
        model,
        path,
        generator=torch.Generator(device).manual_seed(seed),
        device=device,
        autocast=dtype == torch.bfloat16,
        **kw,
    )
    max_tv, tv_sum, noise_sum, count = 0.0, 0.0, 0.0, 0
    for x, t, h in recorder.states:
        tv, p = forward_tv(model, x, t, h if h_conditioned else None, dtype)
        max_tv = max(max_tv, float(tv.max()))
        tv_sum += float(tv.sum())
        noise_sum += float(sampling_noise_tv(p, n_samples).sum())
        count += tv.numel()
    noise = noise_sum / count
    return ForwardPrecisionCheck(
        dtype=str(dtype).removeprefix("torch."),
        n_samples=n_samples,
        n_states=len(recorder.states),
        max_tv=max_tv,
        mean_tv=tv_sum / count,
        noise_tv=noise,
        safe=max_tv < noise,
        same_tokens=float((ref.tokens == low.tokens).double().mean()),
    )
