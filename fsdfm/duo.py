"""Duo (Sahoo et al. 2025, arXiv 2506.10892): uniform-state diffusion as the argmax of a Gaussian diffusion, its
curriculum, and discrete consistency distillation (DCD) on the Gaussian DDIM's deterministic trajectories.

The duality. A Gaussian latent of the one-hot data, w = alpha~ e_{x_1} + sigma~ eps (eps ~ N(0, I_V)), has an
argmax with the uniform-state marginal  argmax(w) = x_1 w.p. kappa, else uniform over the V tokens, where with the
signal-to-noise ratio m = alpha~ / sigma~ (argmax is scale free)

    P(argmax = x_1) = int phi(z - m) Phi(z)^(V-1) dz,    kappa = T(m) = (V P - 1) / (V - 1)        (Duo eq. 10)

so the suite's uniform-source mixture path with kappa(t) is the argmax of the Gaussian path with m(t) =
T^-1(kappa(t)) (`snr_of_kappa`; tests/test_duo.py checks it by chi-square). On this suite's time (t = 0 source,
t = 1 data) the linear kappa(t) = t is the authors' log-linear alpha_t = 1 - t.

Curriculum (`DuoObjective`): for training steps in [curriculum_start, curriculum_end) (fractions of train.steps;
authors: steps 100k to 200k of 1M) the network sees the tempered relaxation softmax(w / tau) of the latent,
log10 tau going linearly from -1 to -2 (authors' gumbel_tau_log10 start/end; tau = 10^-1 before the start); after
it, the discrete x_t = argmax(w), drawn as path.sample (the same law). Deviations: the loss is the suite's
uniform-source DFM cross-entropy on x_1, not Duo's uniform-state ELBO; the authors restrict the curriculum's
log-SNR to gamma in [-3.5, -1.75] (tuned for V = 50,257), here t ~ U[0, 1 - eps] throughout.

DCD (`DCDObjective`): from one eps per row, x_t = argmax(m(t) e + eps) and x_s = argmax(m(s) e + eps) with s = t + h
(the DDIM trajectory of the data point: deterministic given eps, `ddim_trajectory`); the student at (x_t, t)
matches the frozen teacher's denoiser at (x_s, s) (one teacher forward per row); loss kl_bwd (authors' default,
KL(student || teacher)) or kl (forward). Rounds double h (authors: h = 2^n / 64, teacher <- student every 10k
steps, raw weights: teacher_ema False).

Sampling (`ancestral_step`): the exact per-position reverse step given the denoiser's posterior p(x_1 | x_t),

    q(x_s = v | x_t = z) = sum_u p(u) q(x_s = v | x_t = z, x_1 = u)
                         prop. to [rho 1(v = z) + (1 - rho) / V] [kappa_s p~(v) + (1 - kappa_s) / V],
    p~(u) prop. to p(u) / q(x_t = z | x_1 = u),   q(z | u) = kappa_t 1(u = z) + (1 - kappa_t) / V,   rho = kappa_t / kappa_s.

The authors' step (their `_posterior_from_x0`) is the second line with p~ = their x0 prediction, normalised once.
That pairing is right for a network trained with Duo's ELBO, whose optimum is the x0 that makes the plug-in's rates
exact; it is not right for the posterior p(x_1 | x_t) itself: plugged in unweighted, even the exact posterior at
128 steps samples 1.35 nats/token on a Markov source whose entropy rate is 0.59 (tests/test_exact_duo.py). This
suite trains Duo with cross-entropy (the deviation above), whose minimiser is the posterior, so the reweighting by
1 / q(x_t | x_1) makes its sampler consistent (the exact posterior then reproduces the source as the budget grows);
the authors' released (ELBO-trained) checkpoints are sampled with their own unweighted step (`posterior=False`).
Greedy-tail: the last step takes argmax p instead of a draw (no extra forward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsdfm.paths import MixturePath
from fsdfm.train import StepContext

_Z_POINTS = 4001


def kappa_of_snr(m: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """T(m): the uniform-state kappa of argmax(m e_x + eps) (module docstring); m (N,) >= 0 -> (N,) float64.
    The integral by the trapezoid rule on z in [-12, m + 12] (4,001 points; phi is below 1e-31 outside)."""
    m = torch.as_tensor(m, dtype=torch.float64).reshape(-1)
    u = torch.linspace(0.0, 1.0, _Z_POINTS, dtype=torch.float64)
    z = -12.0 + u[None, :] * (m[:, None] + 24.0)  # (N, G)
    log_f = -0.5 * (z - m[:, None]) ** 2 - 0.5 * math.log(2 * math.pi) + (vocab_size - 1) * torch.special.log_ndtr(z)
    p = torch.trapezoid(torch.exp(log_f), z, dim=1)
    return (vocab_size * p - 1.0) / (vocab_size - 1)


def snr_of_kappa(kappa: torch.Tensor, vocab_size: int, iters: int = 50) -> torch.Tensor:
    """T^-1 by bisection on m in [0, 64] (T is increasing): kappa (N,) in [0, 1) -> m (N,) float64."""
    kappa = torch.as_tensor(kappa, dtype=torch.float64).reshape(-1)
    kappa, back = torch.unique(kappa, return_inverse=True)  # rows often share a time: solve each value once
    lo, hi = torch.zeros_like(kappa), torch.full_like(kappa, 64.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = kappa_of_snr(mid, vocab_size) < kappa
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2)[back]


@functools.lru_cache(maxsize=8)
def _snr_table(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T on 4,097 points of m in [0, 32] (T(32) = 1 to float64 for any vocabulary a GPU holds), once per V."""
    m = torch.linspace(0.0, 32.0, 4097, dtype=torch.float64)
    return m, torch.cat([kappa_of_snr(c, vocab_size) for c in m.split(512)])


def snr_of_kappa_fast(kappa: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """T^-1 by linear interpolation in a table of T (`_snr_table`; |T(result) - kappa| < 1e-5): the training
    objectives call it at every step for every row, where the bisection (`snr_of_kappa`) would dominate the step."""
    m_grid, k_grid = _snr_table(vocab_size)
    kappa = torch.as_tensor(kappa, dtype=torch.float64).reshape(-1).cpu()
    i = torch.searchsorted(k_grid, kappa).clamp(1, len(k_grid) - 1)
    k0, k1 = k_grid[i - 1], k_grid[i]
    w = ((kappa - k0) / (k1 - k0).clamp_min(1e-300)).clamp(0.0, 1.0)
    return m_grid[i - 1] + w * (m_grid[i] - m_grid[i - 1])


KAPPA_ONE = 1.0 - 1e-9  # at or above: the latent is the data (m = infinity)


def gaussian_latent(x_1: torch.Tensor, m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """w / sigma~ = m e_{x_1} + eps. x_1 (B, L) long, m (B,), eps (B, L, V) -> (B, L, V) float64."""
    return F.one_hot(x_1, eps.shape[-1]).to(torch.float64) * m.to(torch.float64)[:, None, None] + eps.double()


def argmax_latent(x_1: torch.Tensor, kappa: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x = argmax(m(kappa) e_{x_1} + eps) per row; x_1 itself where kappa >= KAPPA_ONE.
    x_1 (B, L) long, kappa (B,), eps (B, L, V) -> (B, L) long."""
    kappa = kappa.to(torch.float64)
    m = snr_of_kappa_fast(kappa.clamp(max=KAPPA_ONE), eps.shape[-1]).to(eps.device)
    x = gaussian_latent(x_1, m, eps).argmax(-1)
    return torch.where((kappa >= KAPPA_ONE)[:, None], x_1, x)


def ddim_trajectory(x_1: torch.Tensor, kappas, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """The discrete DDIM trajectory of the data x_1 (B, L) through kappas (K,): one eps ~ N(0, I_V) per position,
    drawn once from `generator`, and x_k = argmax_latent(x_1, kappa_k, eps) -> (K, B, L) long. Deterministic given
    the generator's seed: eps is its only randomness."""
    eps = torch.randn((*x_1.shape, vocab_size), dtype=torch.float64, device=x_1.device, generator=generator)
    kap = torch.as_tensor(kappas, dtype=torch.float64).reshape(-1)
    return torch.stack([argmax_latent(x_1, k.expand(x_1.shape[0]), eps) for k in kap])


@dataclass(frozen=True)
class DuoConfig:
    """The Duo curriculum (fractions of train.steps; authors 0.1 and 0.2 of 1M steps) and its temperatures."""

    curriculum_start: float = 0.1
    curriculum_end: float = 0.2
    tau_log10_start: float = -1.0
    tau_log10_end: float = -2.0
    eps: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.curriculum_start <= self.curriculum_end <= 1.0:
            raise ValueError(
                f"need 0 <= curriculum_start <= curriculum_end <= 1, got {self.curriculum_start}, {self.curriculum_end}"
            )

    def tau(self, step: int, total: int) -> float | None:
        """The relaxation's temperature at optimiser step `step` of `total`; None once the curriculum is over."""
        frac = step / max(1, total)
        if frac >= self.curriculum_end:
            return None
        if frac < self.curriculum_start:
            return 10.0**self.tau_log10_start
        span = max(self.curriculum_end - self.curriculum_start, 1e-12)
        a = (frac - self.curriculum_start) / span
        return 10.0 ** (self.tau_log10_start + a * (self.tau_log10_end - self.tau_log10_start))


class DuoObjective:
    """Uniform-source CE on x_1 at every position, the input the tempered relaxation softmax(w / tau) of the
    Gaussian latent during the curriculum, the discrete x_t after it (module docstring)."""

    def __init__(self, path: MixturePath, cfg: DuoConfig):
        if path.source.name != "uniform":
            raise ValueError(f"Duo is a uniform-state diffusion, got source {path.source.name!r}")
        self.path, self.cfg = path, cfg

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        t = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator) * (1.0 - self.cfg.eps)
        tau = self.cfg.tau(ctx.step, ctx.total_steps)
        if tau is None:
            x_t = self.path.sample(x_1, t, ctx.generator).x_t  # the law of argmax(w) (the duality)
        else:
            kappa = self.path.scheduler.kappa(t.double())
            m = snr_of_kappa_fast(kappa, self.path.vocab_size).to(x_1.device)
            eps = torch.randn((*x_1.shape, self.path.vocab_size), device=x_1.device, generator=ctx.generator)
            sigma = 1.0 / torch.sqrt(1.0 + m**2)  # sigma~ of the variance-preserving latent, m = alpha~ / sigma~
            w = gaussian_latent(x_1, m, eps) * sigma[:, None, None]
            x_t = torch.softmax(w / tau, -1).float()
        logits = ctx.model(x_t, t)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x_1.reshape(-1))


class DCDObjective:
    """One DCD round at gap h: t ~ U[0, 1 - h], s = t + h, (x_t, x_s) on one DDIM trajectory; the student at
    (x_t, t) matches the frozen teacher at (x_s, s). loss: "kl_bwd" (authors) or "kl"."""

    TEACHER_NFE = 1

    def __init__(self, teacher, path: MixturePath, h: float, loss: str = "kl_bwd"):
        if loss not in ("kl", "kl_bwd"):
            raise ValueError(f"DCD loss must be kl or kl_bwd, got {loss!r}")
        self.teacher, self.path, self.h, self.loss = teacher, path, float(h), loss

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        t = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator).double() * (1.0 - self.h)
        s = t + self.h
        eps = torch.randn((*x_1.shape, self.path.vocab_size), device=x_1.device, generator=ctx.generator)
        sched = self.path.scheduler
        x_t = argmax_latent(x_1, sched.kappa(t), eps)
        x_s = argmax_latent(x_1, sched.kappa(s.clamp(max=1.0)), eps)
        with torch.no_grad():
            log_teacher = torch.log_softmax(self.teacher(x_s, s.float()).double(), -1)
        log_student = torch.log_softmax(ctx.model(x_t, t.float()).double(), -1)
        if self.loss == "kl_bwd":
            per = (log_student.exp() * (log_student - log_teacher)).sum(-1)
        else:
            per = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
        return per.mean().float()


def ancestral_step(
    x: torch.Tensor,
    p: torch.Tensor,
    kappa_t: float,
    kappa_s: float,
    generator: torch.Generator | None,
    greedy: bool = False,
    posterior: bool = True,
) -> torch.Tensor:
    """One uniform-state step t -> s: the exact per-position reverse step given the posterior p (module
    docstring). x (B, L) long, p (B, L, V) probabilities of x_1 -> (B, L) long; greedy (the greedy tail, for the
    last step): argmax p. posterior: p is the posterior p(x_1 | x_t) (a CE-trained or the exact denoiser: reweighted
    first); False: p is an x0 trained by Duo's ELBO for the plug-in formula (the authors' released models)."""
    if greedy:
        return p.argmax(-1)
    V = p.shape[-1]
    idx = x[..., None]
    # Every factor below is affine in z = one_hot(x): computed for the whole row at z = 0 and corrected at the one
    # entry where z = 1. The values are those of the dense one-hot form bit for bit (kappa * 0 + c == c, and each
    # entry sees the same operations in the same order), with half the passes over the (B, L, V) float64 tensors;
    # the in-place operations allocate nothing new.
    q = p.to(torch.float64, copy=True)
    if posterior:  # p~ = p / q(x_t | x_1): the posterior turned into the x0 the plug-in formula expects
        # divisors as 0-dim tensors on q's device: CUDA divides by a host scalar as a multiply by its reciprocal
        # (1 ulp off a true division); a tensor divisor is a true division, as in the dense form
        c = (1.0 - kappa_t) / V
        at_x = q.gather(-1, idx) / q.new_tensor(kappa_t + c)
        q.div_(q.new_tensor(c)).scatter_(-1, idx, at_x)
        q.div_(q.sum(-1, keepdim=True))
    rho = kappa_t / kappa_s
    a0 = (1.0 - rho) / V
    q.mul_(kappa_s).add_((1.0 - kappa_s) / V)  # kappa_s p~ + (1 - kappa_s) / V
    at_x = (a0 + rho) * q.gather(-1, idx)  # a = a0 + rho z: the one entry with z = 1
    q.mul_(a0).scatter_(-1, idx, at_x)
    q.div_(q.sum(-1, keepdim=True))
    u = torch.rand(q.shape[:-1] + (1,), dtype=torch.float64, device=q.device, generator=generator)
    return torch.searchsorted(q.cumsum_(-1), u).squeeze(-1).clamp(max=V - 1)
