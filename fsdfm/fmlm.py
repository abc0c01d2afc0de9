"""FMLM: a flow-map language model distilled from an FLM teacher by the semigroup rule (DESIGN 2.3).

Two-time denoiser and flow map (times: tau conditions the network, gamma = alpha^{-1}(tau) does the arithmetic):

    D_theta(x, s, t) = softmax(f_theta(x, tau_s, tau_t))        a DiT with h_embedding="raw", h := tau_t
    X_{s,t}(x) = ((1 - gamma_t) / (1 - gamma_s)) x + ((gamma_t - gamma_s) / (1 - gamma_s)) D_theta(x, s, t)

The flow map is FLM's Euler step with D allowed to depend on where the jump lands, so it is exact when D_theta is
the average of the teacher's D along the ODE path; X_{s,s} = id and X_{s,1} = D_theta(x, s, 1). Both the network
and the grids speak tau (as FLM does), while the flow-map coefficients, like the state x_gamma, use gamma.

Initialisation: `fmlm_student(teacher)` copies the FLM teacher and adds the zero-initialised second-scalar path of
the DiT, so at the start D_theta(x, s, t) = D_teacher(x, s) for every t: the flow map starts as the teacher's
Euler step of size gamma_t - gamma_s, and is exact on the diagonal t = s.

Distillation (three kinds of rows, shares in FMLMConfig; x_s = (1 - gamma_s) eps + gamma_s onehot(x_1)):
* semigroup rows: d ~ U(0, 1], tau_s ~ U[0, 1 - d), tau_t = tau_s + d, tau_u between them (uniform, or a fixed
  fraction). Composing X_{u,t} after X_{s,u} and matching X_{s,t} gives the target (no gradient)
      D* = lambda D(x_s, s, u) + (1 - lambda) D(X_{s,u}(x_s), u, t),  lambda = (1-gamma_t)(gamma_u-gamma_s) / ((1-gamma_u)(gamma_t-gamma_s))
  (lambda = 0 at u = s, 1 at u = t), evaluated by the student itself (or its EMA copy);
* diagonal rows (s = t): the target is the frozen teacher's D(x_s, s), which anchors the map to the FLM;
* boundary rows: s = 0, t = 1 with the semigroup target, so the one-step map gets a fixed share of the batch.
The loss is the soft cross-entropy -sum_v D*_v log D_theta(x_s, s, t)_v, averaged over rows and positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fsdfm.flm import ContinuousSampleOutput, FLMTime, flow_map, noisy_state, sample_continuous
from fsdfm.model import DiT, student_from_teacher
from fsdfm.train import StepContext

# probs(x (B, L, V), tau_s (B,), tau_t (B,)) -> D (B, L, V)
ProbDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def semigroup_lambda(gamma_s: torch.Tensor, gamma_u: torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
    """lambda = (1 - gamma_t)(gamma_u - gamma_s) / ((1 - gamma_u)(gamma_t - gamma_s)), clamped to [0, 1].

    From X_{u,t}(X_{s,u}(x)) = ((1-t)/(1-s)) x + ((1-t)(u-s)/((1-u)(1-s))) D_1 + ((t-u)/(1-u)) D_2 = X_{s,t}(x) with
    D = lambda D_1 + (1 - lambda) D_2. Computed as [(u - s)/(t - s)] [(1 - t)/(1 - u)] with the limits that keep the
    identity true: the first factor is 0 when t = s (no interval to split), the second is 1 when u = t = 1."""
    one = torch.ones_like(gamma_t)
    span = torch.where(
        gamma_t > gamma_s,
        (gamma_u - gamma_s) / torch.where(gamma_t > gamma_s, gamma_t - gamma_s, one),
        torch.zeros_like(gamma_t),
    )
    shrink = torch.where(gamma_u < 1.0, (1.0 - gamma_t) / torch.where(gamma_u < 1.0, 1.0 - gamma_u, one), one)
    return (span * shrink).clamp(0.0, 1.0)


@torch.no_grad()
def semigroup_target(
    denoise: ProbDenoiser,
    time: FLMTime,
    x_s: torch.Tensor,
    tau_s: torch.Tensor,
    tau_u: torch.Tensor,
    tau_t: torch.Tensor,
) -> torch.Tensor:
    """D* = lambda D(x_s, s, u) + (1 - lambda) D(X_{s,u}(x_s), u, t). x_s: (B, L, V); taus: (B,) -> (B, L, V)."""
    g_s, g_u, g_t = (time.gamma_of_tau(tau.to(torch.float64)) for tau in (tau_s, tau_u, tau_t))
    d_su = denoise(x_s, tau_s, tau_u)
    d_ut = denoise(flow_map(x_s, d_su, g_s, g_u), tau_u, tau_t)
    lam = semigroup_lambda(g_s, g_u, g_t).to(d_su.dtype)[:, None, None]
    return lam * d_su + (1.0 - lam) * d_ut


@dataclass(frozen=True)
class FMLMConfig:
    """Row shares of an FMLM distillation batch and how the target is formed.

    diagonal_share / boundary_share: fractions of each batch (rounded to whole rows) trained on s = t against the
        teacher / on (s, t) = (0, 1); the rest are semigroup rows.
    u_fraction: None draws tau_u ~ U(tau_s, tau_t); a number in (0, 1) fixes tau_u = tau_s + u_fraction (tau_t - tau_s)
        (0.5: the midpoint, as the FLM authors' code does).

    The defaults are the FLM authors' (diagonal 0.5, boundary 0.016, midpoint u). Before they were ours
    (diagonal 0.25, boundary 0.10, u ~ U(s, t)): set those three to get the old behaviour.
    ema_target: evaluate the semigroup target with the EMA copy of the student (fit's ctx.ema) instead of the student.
    """

    diagonal_share: float = 0.5
    boundary_share: float = 0.016
    u_fraction: float | None = 0.5
    ema_target: bool = False

    def __post_init__(self):
        for name in ("diagonal_share", "boundary_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FMLMConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.diagonal_share + self.boundary_share > 1.0:
            raise ValueError(
                f"FMLMConfig: diagonal_share + boundary_share must be <= 1, got "
                f"{self.diagonal_share} + {self.boundary_share}"
            )
        if self.u_fraction is not None and not 0.0 < self.u_fraction < 1.0:
            raise ValueError(f"FMLMConfig.u_fraction must be in (0, 1) or null, got {self.u_fraction!r}")

    def row_counts(self, batch_size: int) -> tuple[int, int, int]:
        """(diagonal, boundary, semigroup) rows of a batch of batch_size."""
        n_diag = round(batch_size * self.diagonal_share)
        n_bound = min(round(batch_size * self.boundary_share), batch_size - n_diag)
        return n_diag, n_bound, batch_size - n_diag - n_bound


def fmlm_student(teacher: DiT) -> DiT:
    """The FMLM student: the FLM teacher's weights plus a zero-output embedding of the second time tau_t (raw)."""
    return student_from_teacher(teacher, h_embedding="raw")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over (B, L) of -sum_v target_v log softmax(logits)_v. logits, target: (B, L, V)."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class FMLMObjective:
    """Loss for `fit` on the FMLM student (ctx.model: D_theta(x, tau_s, tau_t) as model(x, t=tau_s, h=tau_t)),
    distilled from a frozen FLM `teacher` (model(x, tau) -> logits). Rows: [diagonal | boundary | semigroup]."""

    def __init__(self, teacher: nn.Module, time: FLMTime, cfg: FMLMConfig = FMLMConfig()):
        self.teacher = teacher.eval().requires_grad_(False)
        self.time, self.cfg = time, cfg

    def times(self, batch_size: int, generator: torch.Generator, device: torch.device):
        """tau_s, tau_u, tau_t (B,) float64 in the row layout [diagonal | boundary | semigroup] of `row_counts`."""
        n_diag, n_bound, n_semi = self.cfg.row_counts(batch_size)
        f64 = dict(device=device, dtype=torch.float64)
        rand = lambda n: torch.rand(n, generator=generator, **f64)  # noqa: E731
        diag = rand(n_diag)
        gap = torch.cat([torch.ones(n_bound, **f64), 1.0 - rand(n_semi)])  # boundary rows: gap 1; others in (0, 1]
        s = torch.cat([torch.zeros(n_bound, **f64), rand(n_semi) * (1.0 - gap[n_bound:])])
        frac = rand(n_bound + n_semi) if self.cfg.u_fraction is None else torch.full_like(s, self.cfg.u_fraction)
        tau_s = torch.cat([diag, s])
        return tau_s, torch.cat([diag, s + frac * gap]), torch.cat([diag, (s + gap).clamp(max=1.0)])

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        B, device = x_1.shape[0], x_1.device
        n_diag = self.cfg.row_counts(B)[0]
        tau_s, tau_u, tau_t = self.times(B, ctx.generator, device)
        x_s = noisy_state(x_1, self.time.gamma_of_tau(tau_s), self.time.K, ctx.generator)
        logits = ctx.model(x_s, tau_s.float(), tau_t.float())
        with torch.no_grad():
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            target_model = ctx.model
            if self.cfg.ema_target:
                if ctx.ema is None:
                    raise ValueError("FMLMConfig.ema_target=True needs an EMA copy: set optim.ema_decay")
                target_model = ctx.ema
            parts = []
            if n_diag > 0:
                parts.append(torch.softmax(self.teacher(x_s[:n_diag], tau_s[:n_diag].float()).float(), dim=-1))
            if n_diag < B:

                def student(x, a, b):
                    return torch.softmax(target_model(x, a.float(), b.float()).float(), dim=-1)

                parts.append(
                    semigroup_target(student, self.time, x_s[n_diag:], tau_s[n_diag:], tau_u[n_diag:], tau_t[n_diag:])
                )
            target = torch.cat(parts)
        return soft_cross_entropy(logits, target)


def sample_fmlm(student: Callable, time: FLMTime, *, n_steps: int, **kwargs) -> ContinuousSampleOutput:
    """k = n_steps flow-map jumps on a uniform tau grid: x <- X_{s,t}(x) with D_theta(x, tau_s, tau_t) =
    softmax(student(x, tau_s, tau_t)); tokens = argmax of the last D (the last jump lands at gamma = 1). NFE = k.
    Other kwargs as `fsdfm.flm.sample_continuous` (seed, max_state_bytes, precision, device, autocast)."""
    return sample_continuous(lambda x, tau_s, tau_t: student(x, tau_s, tau_t), time, n_steps=n_steps, **kwargs)
