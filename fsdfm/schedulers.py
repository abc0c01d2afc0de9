"""kappa(t) schedulers of the mixture path, their derivatives and inverses.

The mixture path keeps each position at the data token x_1 with probability kappa(t) and at the
source token x_0 otherwise, with kappa(0) = 0 and kappa(1) = 1. Every sampler and loss reads kappa from
a scheduler object injected into the path, so kappa is defined in exactly one place.

    rate g(t)          = kappa'(t) / (1 - kappa(t))
    cumulative G_{t,h} = ln[(1 - kappa(t)) / (1 - kappa(t + h))] = integral of g over [t, t + h]
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from fsdfm.registry import Registry

SCHEDULERS: Registry = Registry("scheduler")


@dataclass(frozen=True)
class SchedulerOutput:
    """kappa(t), its derivative d_kappa and the rate g(t) = d_kappa / (1 - kappa); each shaped like t."""

    kappa: torch.Tensor
    d_kappa: torch.Tensor
    rate: torch.Tensor


class Scheduler(abc.ABC):
    """Base class: subclasses define `kappa`, `d_kappa` and `kappa_inverse` on tensors."""

    name = "base"

    @abc.abstractmethod
    def kappa(self, t: torch.Tensor) -> torch.Tensor:
        """kappa(t), elementwise."""

    @abc.abstractmethod
    def d_kappa(self, t: torch.Tensor) -> torch.Tensor:
        """d kappa / dt, elementwise."""

    @abc.abstractmethod
    def kappa_inverse(self, k: torch.Tensor) -> torch.Tensor:
        """t such that kappa(t) = k, elementwise."""

    def __call__(self, t: torch.Tensor) -> SchedulerOutput:
        kappa = self.kappa(t)
        d_kappa = self.d_kappa(t)
        return SchedulerOutput(kappa=kappa, d_kappa=d_kappa, rate=d_kappa / (1.0 - kappa))

    def survival_ratio(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """r = (1 - kappa(t + h)) / (1 - kappa(t)) = exp(-G_{t,h}); in [0, 1], exactly 0 when t + h = 1."""
        return (1.0 - self.kappa(torch.clamp(t + h, max=1.0))) / (1.0 - self.kappa(t))

    def cumulative_rate(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """G_{t,h} = ln[(1 - kappa(t)) / (1 - kappa(t + h))] (inf when t + h = 1)."""
        return -torch.log(self.survival_ratio(t, h))

    def describe(self) -> dict:
        return {"name": self.name}


@SCHEDULERS.register("polynomial")
class PolynomialScheduler(Scheduler):
    """kappa(t) = t^n (n = 1 is the linear schedule of FS-DFM and DFM)."""

    name = "polynomial"

    def __init__(self, n: float = 1.0):
        if not n > 0:
            raise ValueError(f"polynomial scheduler exponent n must be > 0, got {n}")
        self.n = float(n)

    def kappa(self, t):
        return t.clamp(0.0, 1.0) ** self.n

    def d_kappa(self, t):
        return self.n * t.clamp(0.0, 1.0) ** (self.n - 1.0)

    def kappa_inverse(self, k):
        return k.clamp(0.0, 1.0) ** (1.0 / self.n)

    def describe(self) -> dict:
        return {"name": self.name, "n": self.n}


@SCHEDULERS.register("cosine")
class CosineScheduler(Scheduler):
    """kappa(t) = 1 - cos(pi t / 2)^2 = sin(pi t / 2)^2."""

    name = "cosine"

    def kappa(self, t):
        return torch.sin(0.5 * math.pi * t.clamp(0.0, 1.0)) ** 2

    def d_kappa(self, t):
        # d/dt sin^2(pi t / 2) = (pi / 2) sin(pi t)
        return 0.5 * math.pi * torch.sin(math.pi * t.clamp(0.0, 1.0))

    def kappa_inverse(self, k):
        return (2.0 / math.pi) * torch.asin(torch.sqrt(k.clamp(0.0, 1.0)))


def make_scheduler(name: str = "polynomial", **kwargs) -> Scheduler:
    """Build a scheduler by registry name, e.g. make_scheduler("polynomial", n=2)."""
    return SCHEDULERS.get(name)(**kwargs)
