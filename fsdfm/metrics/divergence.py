"""Per-position divergence between a few-step student and the many-step teacher from the same states.

Do few-step errors compound along the sequence? From each start state x_s (e.g. a partly masked x_t),
run `n_rollouts` teacher rollouts and `n_rollouts` student rollouts, estimate the per-position marginals
p_s,l (teacher) and q_s,l (student) over the vocabulary from those rollouts, and compare them:

    tv[l]        = mean_s 1/2 sum_v |p_s,l(v) - q_s,l(v)|                              in [0, 1]
    js[l]        = mean_s 1/2 KL(p_s,l || m) + 1/2 KL(q_s,l || m),  m = (p + q) / 2     in [0, ln 2] (nats)
    agreement[l] = mean_{s, r} 1{student_r[l] == teacher_r[l]}   (rollout r of each, paired by index)

and summarise the TV curve by its least-squares slope against normalised position u_l = l / (L - 1):
slope > 0 says the student drifts further from the teacher later in the sequence. The estimates are
plug-in (biased upward for small `n_rollouts`: two samplers with identical marginals still show
TV ~ sqrt(V_eff / n_rollouts)); compare methods at the same `n_rollouts`.

A rollout is a callable `rollout(x, generator) -> tokens`: (B, L) LongTensor start states (mask id =
vocab_size allowed) to (B, L) final tokens in [0, vocab_size). The caller builds it from a sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fsdfm.metrics.registry import register_metric

Rollout = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class PosDivergence:
    """Curves over positions 0..L-1 (`tv`, `js`, `agreement`: (L,) float64) and the TV slope summary."""

    tv: torch.Tensor
    js: torch.Tensor
    agreement: torch.Tensor
    slope: float
    slope_stderr: float
    n_starts: int
    n_rollouts: int

    @property
    def mean_tv(self) -> float:
        """The scalar reported as `pos_divergence`."""
        return float(self.tv.mean())


@dataclass(frozen=True)
class LineFit:
    """Least-squares fit y = intercept + slope * u with the slope's standard error."""

    slope: float
    intercept: float
    slope_stderr: float


def fit_slope(y: torch.Tensor) -> LineFit:
    """OLS of a curve y (L,) against u = linspace(0, 1, L); stderr = sqrt(RSS / (L - 2) / sum (u - u_bar)^2)."""
    y = y.double().flatten()
    length = y.shape[0]
    if length < 3:
        raise ValueError(f"fit_slope: need at least 3 positions for a slope and its standard error, got {length}")
    u = torch.linspace(0.0, 1.0, length, dtype=torch.float64)
    du = u - u.mean()
    sxx = float((du * du).sum())
    slope = float((du * (y - y.mean())).sum()) / sxx
    intercept = float(y.mean()) - slope * float(u.mean())
    rss = float(((y - intercept - slope * u) ** 2).sum())
    return LineFit(slope=slope, intercept=intercept, slope_stderr=math.sqrt(max(rss, 0.0) / (length - 2) / sxx))


def _run(rollout: Rollout, x: torch.Tensor, generator, batch_size: int, vocab_size: int, who: str) -> torch.Tensor:
    outs = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        out = torch.as_tensor(rollout(chunk, generator))
        if out.shape != chunk.shape:
            raise ValueError(
                f"pos_divergence: {who} rollout returned shape {tuple(out.shape)}, expected {tuple(chunk.shape)}"
            )
        if out.dtype.is_floating_point:
            raise ValueError(f"pos_divergence: {who} rollout returned dtype {out.dtype}, expected token ids")
        if int(out.min()) < 0 or int(out.max()) >= vocab_size:
            raise ValueError(
                f"pos_divergence: {who} rollout returned ids in [{int(out.min())}, {int(out.max())}], "
                f"outside the vocabulary [0, {vocab_size}) (a mask token left in the output?)"
            )
        outs.append(out.long().cpu())
    return torch.cat(outs)


def pos_divergence(
    x_start: torch.Tensor,
    teacher_rollout: Rollout,
    student_rollout: Rollout,
    n_rollouts: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> PosDivergence:
    """Per-position TV / JS / agreement between teacher and student rollouts (see the module docstring).

    x_start: (S, L) start states; each is repeated `n_rollouts` times for each sampler (in chunks of
    `batch_size` rows, default all S * n_rollouts at once). `generator` is passed to both rollouts.
    """
    x_start = torch.as_tensor(x_start)
    if x_start.dim() != 2 or x_start.shape[0] == 0:
        raise ValueError(f"pos_divergence: x_start must be (S >= 1, L), got shape {tuple(x_start.shape)}")
    if n_rollouts < 1:
        raise ValueError(f"pos_divergence: n_rollouts must be >= 1, got {n_rollouts}")
    n_starts, length = x_start.shape
    x_rep = x_start.long().repeat_interleave(n_rollouts, dim=0)  # (S * R, L), start state s in rows s*R..s*R+R-1
    batch_size = batch_size or x_rep.shape[0]
    teacher = _run(teacher_rollout, x_rep, generator, batch_size, vocab_size, "teacher")
    student = _run(student_rollout, x_rep, generator, batch_size, vocab_size, "student")

    # Sparse marginals: one key per (start, position, token) instead of an (S, L, V) histogram (V ~ 50k).
    cell = torch.arange(n_starts).repeat_interleave(n_rollouts).unsqueeze(1) * length + torch.arange(length)
    keys = torch.cat([(cell * vocab_size + teacher).flatten(), (cell * vocab_size + student).flatten()])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    half = teacher.numel()
    weight = torch.full((half,), 1.0 / n_rollouts, dtype=torch.float64)
    p = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inverse[:half], weight)  # teacher marginals
    q = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inverse[half:], weight)  # student marginals
    owner = uniq // vocab_size  # flat (start, position) cell of each (cell, token) key
    m = 0.5 * (p + q)
    kl_pm = torch.where(p > 0, p * (p / m).log(), torch.zeros_like(p))
    kl_qm = torch.where(q > 0, q * (q / m).log(), torch.zeros_like(q))
    n_cells = n_starts * length
    tv = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, owner, 0.5 * (p - q).abs())
    js = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, owner, 0.5 * (kl_pm + kl_qm))
    tv = tv.view(n_starts, length).mean(dim=0)
    js = js.view(n_starts, length).mean(dim=0)
    agreement = (teacher == student).double().mean(dim=0)
    fit = fit_slope(tv)
    return PosDivergence(
        tv=tv,
        js=js,
        agreement=agreement,
        slope=fit.slope,
        slope_stderr=fit.slope_stderr,
        n_starts=n_starts,
        n_rollouts=n_rollouts,
    )


# --- recorded by the pos_divergence stage (needs teacher and student rollouts, not samples)
_POS = "fsdfm.metrics.divergence.pos_divergence (needs teacher and student rollouts)"
register_metric(
    "pos_divergence",
    direction="min",
    unit="TV",
    family="divergence",
    show={"pos": 1},
    recorded_by=_POS,
    sources=("fsdfm.metrics.divergence",),
    description="per-position total variation between few-step and many-step teacher marginals from the "
    "same start state (a curve over positions; its mean as a scalar)",
)
register_metric(
    "pos_divergence_slope",
    direction="min",
    unit="TV/sequence",
    family="divergence",
    show={"pos": 3},
    recorded_by=_POS,
    sources=("fsdfm.metrics.divergence",),
    description="least-squares slope of the pos_divergence TV curve against normalised position 0..1 "
    "(positive: error grows)",
)
