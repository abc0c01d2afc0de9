"""Sources x_0 and the mixture probability path.

    x_t[i] = x_1[i] with probability kappa(t), else x_0[i]   (independently per position)

Two sources: `MaskSource` (every position is the extra token mask_id = V, so the network's input
vocabulary is V + 1 while it predicts over V) and `UniformSource` (x_0 uniform over the V data tokens).
The source also says which positions may still move during sampling: under the mask source an
unmasked token is final (the carry-over rule of masked diffusion), under the uniform source every
position may move.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from fsdfm.registry import Registry
from fsdfm.schedulers import Scheduler

SOURCES: Registry = Registry("source")


@dataclass(frozen=True)
class PathSample:
    """A draw from the mixture path. x_0, x_1, x_t: (B, L) long; t: (B,) float."""

    x_0: torch.Tensor
    x_1: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor


class Source(abc.ABC):
    """Base class of the source distributions x_0."""

    name = "base"

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)

    @property
    def input_vocab_size(self) -> int:
        """Rows of the network's token embedding."""
        return self.vocab_size

    @abc.abstractmethod
    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x_0 of the given shape (long)."""

    def movable(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask (same shape as x) of positions that may still change."""
        return torch.ones_like(x, dtype=torch.bool)


@SOURCES.register("mask")
class MaskSource(Source):
    """All-[MASK] source; mask_id = vocab_size."""

    name = "mask"

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size + 1

    def sample(self, shape, generator=None, device=None):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def movable(self, x):
        return x == self.mask_id


@SOURCES.register("uniform")
class UniformSource(Source):
    """x_0 uniform over the V data tokens."""

    name = "uniform"

    def sample(self, shape, generator=None, device=None):
        return torch.randint(self.vocab_size, shape, generator=generator, device=device)


class MixturePath:
    """The mixture path built from an injected scheduler (kappa) and source (x_0)."""

    def __init__(self, scheduler: Scheduler, source: Source):
        self.scheduler = scheduler
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.source.vocab_size

    def sample(self, x_1: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw x_t ~ p_t(. | x_1). x_1: (B, L) long, t: (B,) -> PathSample."""
        x_0 = self.source.sample(tuple(x_1.shape), generator=generator, device=x_1.device)
        kappa = self.scheduler.kappa(t).to(torch.float64)[:, None]
        u = torch.rand(x_1.shape, generator=generator, device=x_1.device, dtype=torch.float64)
        x_t = torch.where(u < kappa, x_1, x_0)
        return PathSample(x_0=x_0, x_1=x_1, x_t=x_t, t=t)

    def describe(self) -> dict:
        return {"scheduler": self.scheduler.describe(), "source": self.source.name, "vocab_size": self.vocab_size}


def make_path(scheduler: Scheduler, source: str, vocab_size: int) -> MixturePath:
    return MixturePath(scheduler, SOURCES.get(source)(vocab_size))
