"""FLM: a flow language model that denoises one-hot encodings corrupted by Gaussian noise (DESIGN 2.3).

State and denoiser (per position, V = vocabulary size = K):

    x_gamma = (1 - gamma) eps + gamma onehot(x_1),   eps ~ N(0, I) in R^{L x V},  gamma in [0, 1]
    D(x_gamma, tau) = softmax(f_theta(x_gamma, tau))      f_theta: the DiT reading a float state (B, L, V)

Training is cross-entropy to x_1. The network is conditioned on the *decoding accuracy* tau rather than gamma:

    tau = alpha(gamma) = K / (K - 1) (q(gamma) - 1/K),   q(gamma) = E_{z ~ N(0,1)}[ Phi(z + gamma / (1 - gamma))^{K-1} ]

q(gamma) is the probability that argmax x_gamma = x_1 (the true coordinate beats K - 1 Gaussian rivals), so
alpha rescales it from chance (1/K at gamma = 0) to certainty (1 at gamma = 1); tau ~ U[0, 1] then spreads the
training steps evenly over how decodable the state is. `FLMTime` computes alpha by Gauss-Hermite quadrature and
inverts it with a monotone lookup table.

Sampling (Euler on the ODE dx/dgamma = (D(x) - x) / (1 - gamma)) on a uniform tau grid mapped to gamma:

    z <- z + (gamma' - gamma) (D(z) - z) / (1 - gamma)  =  ((1 - gamma') / (1 - gamma)) z + ((gamma' - gamma) / (1 - gamma)) D(z)

which is exactly the FMLM flow map X_{gamma, gamma'} with D held fixed (`flow_map`); the last step (gamma' = 1)
lands on D, whose argmax is the output. NFE = number of steps.

Memory: the state is B x L x V floats, so `sample_continuous` processes the batch in chunks of
`state_chunk_size(L, V, dtype, max_state_bytes)` samples. Noise is drawn per *sample* from a generator seeded by
(seed, sample index), so the tokens do not depend on the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fsdfm.memory import peak_memory, reset_peak_memory
from fsdfm.samplers import SampleOutput, time_grid
from fsdfm.train import StepContext, step_seed

MAX_QUADRATURE = 350  # numpy's Hermite_e weights overflow to NaN a little beyond this


class FLMTime:
    """The decoding-accuracy time change tau = alpha(gamma) for vocabulary size K, and its inverse.

    alpha: Gauss-Hermite quadrature (probabilists' nodes z_i, weights w_i / sqrt(2 pi), so sum w = 1) of
    Phi(z + m)^{K-1} = exp((K - 1) log Phi(z + m)), m = gamma / (1 - gamma), in float64 log space (Phi^{K-1}
    underflows for large K). The raw quadrature q^ is normalised affinely so both ends are exact:
    alpha = (q^(gamma) - q^(0)) / (1 - q^(0)). With exact quadrature q^(0) = 1/K and this is the formula above; for
    K ~ 5e4 and 200 nodes q^(0) is within ~1e-4 relative of 1/K, so the change is below the table's resolution.

    gamma_of_tau: linear interpolation in a table of n_table gamma values evenly spaced on [0, 1] and their tau
    values, made non-decreasing, then restricted to strictly increasing tau. tau saturates at 1 (in float64)
    before gamma does, so saturated interior points are dropped and (tau, gamma) = (1, 1) is kept: the inverse is
    exact at both ends (0 <-> 0, 1 <-> 1) and accurate to about one grid spacing 1 / (n_table - 1) inside.
    """

    def __init__(self, vocab_size: int, n_quadrature: int = 200, n_table: int = 4097):
        if int(vocab_size) < 2:
            raise ValueError(f"FLMTime: vocab_size must be >= 2, got {vocab_size!r}")
        if not 2 <= int(n_quadrature) <= MAX_QUADRATURE:
            raise ValueError(f"FLMTime: n_quadrature must be in 2..{MAX_QUADRATURE}, got {n_quadrature!r}")
        if int(n_table) < 2:
            raise ValueError(f"FLMTime: n_table must be >= 2, got {n_table!r}")
        self.K, self.n_quadrature, self.n_table = int(vocab_size), int(n_quadrature), int(n_table)
        z, w = np.polynomial.hermite_e.hermegauss(self.n_quadrature)
        # Per-device copies of (nodes, weights) and of the inverse table (tau, gamma), all float64.
        self._nodes = {torch.device("cpu"): (torch.from_numpy(z), torch.from_numpy(w / np.sqrt(2.0 * np.pi)))}
        self.q0 = float(self._q_hat(torch.zeros(1, dtype=torch.float64))[0])
        gamma = torch.linspace(0.0, 1.0, self.n_table, dtype=torch.float64)
        tau = torch.cummax(self.alpha(gamma), dim=0).values
        keep = torch.cat([torch.tensor([True]), tau[1:] > tau[:-1]]) & (tau < 1.0)
        one = torch.ones(1, dtype=torch.float64)
        self._table = {torch.device("cpu"): (torch.cat([tau[keep], one]), torch.cat([gamma[keep], one]))}

    @staticmethod
    def _on(cache: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in cache:
            cache[device] = tuple(t.to(device) for t in cache[torch.device("cpu")])
        return cache[device]

    def _q_hat(self, gamma: torch.Tensor) -> torch.Tensor:
        """Raw quadrature of q(gamma) for float64 gamma (...,) -> (...,). gamma = 1 gives m = inf, Phi = 1, q = 1."""
        z, w = self._on(self._nodes, gamma.device)
        m = gamma / (1.0 - gamma)
        log_phi = torch.special.log_ndtr(z + m[..., None])  # (..., n_quadrature)
        return (w * torch.exp((self.K - 1) * log_phi)).sum(-1)

    def q(self, gamma: torch.Tensor) -> torch.Tensor:
        """P(argmax x_gamma = x_1) by quadrature (unnormalised, for inspection and tests); same shape and dtype."""
        g = self._check(gamma, "gamma")
        return self._q_hat(g.to(torch.float64)).to(g.dtype)

    def alpha(self, gamma: torch.Tensor) -> torch.Tensor:
        """tau = alpha(gamma) in [0, 1], elementwise; alpha(0) = 0 and alpha(1) = 1 exactly."""
        g = self._check(gamma, "gamma")
        tau = (self._q_hat(g.to(torch.float64)) - self.q0) / (1.0 - self.q0)
        return tau.clamp(0.0, 1.0).to(g.dtype)

    def gamma_of_tau(self, tau: torch.Tensor) -> torch.Tensor:
        """gamma = alpha^{-1}(tau) by linear interpolation in the table, elementwise; same shape, dtype, device."""
        t = self._check(tau, "tau")
        xp, fp = self._on(self._table, t.device)
        x = t.to(torch.float64)
        i = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
        x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
        gamma = y0 + (x - x0) / (x1 - x0) * (y1 - y0)
        return gamma.clamp(0.0, 1.0).to(t.dtype)

    @staticmethod
    def _check(x: torch.Tensor, name: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.float64)
        if x.numel() and not bool(((x >= 0.0) & (x <= 1.0)).all()):
            raise ValueError(f"FLMTime: {name} must lie in [0, 1], got values in [{x.min().item()}, {x.max().item()}]")
        return x


def noisy_state(
    x_1: torch.Tensor,
    gamma: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_gamma = (1 - gamma) eps + gamma onehot(x_1). x_1: (B, L) long; gamma: (B,) -> (B, L, V).

    Built in place on the noise (scatter-add of gamma) so only one B x L x V tensor is allocated."""
    B, L = x_1.shape
    eps = torch.randn((B, L, vocab_size), generator=generator, device=x_1.device, dtype=dtype)
    g = gamma.to(dtype)
    x = eps.mul_((1.0 - g)[:, None, None])
    return x.scatter_add_(-1, x_1[..., None], g[:, None, None].expand(B, L, 1).contiguous())


@dataclass(frozen=True)
class FLMConfig:
    """The FLM objective: tau ~ U[tau_min, tau_max], gamma = alpha^{-1}(tau), CE of f(x_gamma, tau) to x_1."""

    tau_min: float = 0.0
    tau_max: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.tau_min < self.tau_max <= 1.0:
            raise ValueError(
                f"FLMConfig: need 0 <= tau_min < tau_max <= 1, got tau_min={self.tau_min}, tau_max={self.tau_max}"
            )


class FLMObjective:
    """Loss for `fit`: ctx.batch (B, L) token ids -> mean cross-entropy of the clean-token logits."""

    def __init__(self, time: FLMTime, cfg: FLMConfig = FLMConfig()):
        self.time, self.cfg = time, cfg

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        u = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator, dtype=torch.float64)
        tau = self.cfg.tau_min + (self.cfg.tau_max - self.cfg.tau_min) * u
        x_gamma = noisy_state(x_1, self.time.gamma_of_tau(tau), self.time.K, ctx.generator)
        logits = ctx.model(x_gamma, tau.float())
        return F.cross_entropy(logits.float().flatten(0, 1), x_1.flatten())


def flow_map(
    x: torch.Tensor,
    d: torch.Tensor,
    gamma_s: torch.Tensor | float,
    gamma_t: torch.Tensor | float,
    inplace: bool = False,
) -> torch.Tensor:
    """X_{s,t}(x) = ((1 - gamma_t) / (1 - gamma_s)) x + ((gamma_t - gamma_s) / (1 - gamma_s)) d.

    x, d: (B, L, V); gamma_s < 1, gamma_t: (B,) or scalars. The identity at gamma_t = gamma_s, d at gamma_t = 1;
    with d = D(x, s) it is FLM's Euler step, with d = D_theta(x, s, t) the FMLM flow map. Python floats for both
    gammas keep the step free of host-device syncs on a GPU (the samplers pass floats). inplace: overwrite and
    return x (no (B, L, V) temporaries; the samplers' state is theirs to overwrite)."""
    if isinstance(gamma_s, float) and isinstance(gamma_t, float):
        if gamma_s >= 1.0:
            raise ValueError("flow_map: gamma_s must be < 1 (the map starts from a noisy state)")
        a, b = (1.0 - gamma_t) / (1.0 - gamma_s), (gamma_t - gamma_s) / (1.0 - gamma_s)
        return x.mul_(a).add_(d, alpha=b) if inplace else a * x + b * d
    gs = torch.as_tensor(gamma_s, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
    gt = torch.as_tensor(gamma_t, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
    if bool((gs >= 1.0).any()):
        raise ValueError("flow_map: gamma_s must be < 1 (the map starts from a noisy state)")
    a, b = ((1.0 - gt) / (1.0 - gs)).to(x.dtype), ((gt - gs) / (1.0 - gs)).to(x.dtype)
    return x.mul_(a).addcmul_(b, d) if inplace else a * x + b * d


def state_chunk_size(seq_len: int, vocab_size: int, dtype: torch.dtype, max_state_bytes: int) -> int:
    """How many samples' (L, V) states fit in max_state_bytes. The peak is a small multiple of this (the logits
    and D are the same size), so budget about a third of the free memory."""
    per_sample = seq_len * vocab_size * torch.finfo(dtype).bits // 8
    if per_sample > max_state_bytes:
        raise ValueError(
            f"max_state_bytes={max_state_bytes} cannot hold one sample's state "
            f"(L={seq_len} x V={vocab_size} x {dtype} = {per_sample} bytes)"
        )
    return max_state_bytes // per_sample


@dataclass(frozen=True)
class ContinuousSampleOutput(SampleOutput):
    """SampleOutput (tokens, nfe, time_grid = the tau grid, wall_s) plus gamma_grid (steps + 1,) float64, the peak
    memory of the sampling loop (bytes and kind: "cuda_max_allocated" or "process_rss"), the chunk size used and
    the state dtype."""

    gamma_grid: torch.Tensor | None = None
    peak_mem_bytes: int = 0
    peak_mem_kind: str = ""
    chunk_size: int = 0
    precision: str = ""


# denoiser(x (B, L, V), tau_s (B,), tau_t (B,)) -> logits (B, L, V)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

NOISE_SALT = 17  # separates the per-sample noise seeds from the training loop's (seed, step) seeds


def sample_noise(
    seed: int, start: int, n: int, seq_len: int, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """eps for samples start..start+n-1, each from its own generator seeded by (seed, sample index): (n, L, V)."""
    out = torch.empty((n, seq_len, vocab_size), dtype=dtype, device=device)
    for j in range(n):
        g = torch.Generator(device=device).manual_seed(step_seed(seed, start + j, salt=NOISE_SALT))
        out[j] = torch.randn((seq_len, vocab_size), generator=g, dtype=dtype, device=device)
    return out


@torch.no_grad()
def sample_continuous(
    denoiser: Denoiser,
    time: FLMTime,
    *,
    n_samples: int,
    seq_len: int,
    n_steps: int | None = None,
    grid: torch.Tensor | None = None,
    seed: int = 0,
    max_state_bytes: int = 1 << 30,
    precision: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    autocast: bool = False,
) -> ContinuousSampleOutput:
    """x_0 = eps; for each step tau_i -> tau_{i+1} (gamma_i = alpha^{-1}(tau_i)):
    x <- X_{gamma_i, gamma_{i+1}}(x) with d = softmax(denoiser(x, tau_i, tau_{i+1})); tokens = argmax of the last d.

    grid: an increasing tau grid from 0 to 1 (default: uniform with n_steps). The state is kept in `precision`
    (float32 by default: there are no categorical draws, and the network reads the state in its own dtype).
    Peak memory is measured over the loop (fsdfm.metrics.timing)."""
    device = torch.device(device)
    grid = time_grid(n_steps, device=device) if grid is None else grid.to(device=device, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()) or grid[0] != 0 or grid[-1] != 1:
        raise ValueError(f"tau grid must be 1-D, increasing, from 0 to 1, got {grid.tolist()}")
    gammas = time.gamma_of_tau(grid)
    gamma_list = gammas.tolist()  # one sync before the loop; floats keep the steps sync-free
    V, n_total = time.K, grid.numel() - 1
    chunk = state_chunk_size(seq_len, V, precision, max_state_bytes)
    chunks, wall = [], 0.0
    reset_peak_memory(device)
    for start in range(0, n_samples, chunk):
        B = min(chunk, n_samples - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = perf_counter()
        x = sample_noise(seed, start, B, seq_len, V, precision, device)
        for i in range(n_total):
            tau_s, tau_t = grid[i].expand(B), grid[i + 1].expand(B)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = denoiser(x, tau_s.float(), tau_t.float())
            d = torch.softmax(logits, dim=-1, dtype=precision)  # no cast copy of the logits first
            del logits
            x = flow_map(x, d, gamma_list[i], gamma_list[i + 1], inplace=True)
        chunks.append(d.argmax(-1))  # the last step lands on d (gamma = 1); argmax d is the output
        del x, d
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += perf_counter() - t0
    peak, kind = peak_memory(device)
    return ContinuousSampleOutput(
        tokens=torch.cat(chunks).cpu(),
        nfe=n_total,
        time_grid=grid.cpu(),
        wall_s=wall,
        gamma_grid=gammas.cpu(),
        peak_mem_bytes=peak,
        peak_mem_kind=kind,
        chunk_size=chunk,
        precision=str(precision).removeprefix("torch."),
    )


def sample_flm(model: Callable, time: FLMTime, **kwargs) -> ContinuousSampleOutput:
    """FLM sampling: `model(x, tau)` -> logits, Euler steps on a tau grid (see `sample_continuous` for kwargs)."""
    return sample_continuous(lambda x, tau_s, tau_t: model(x, tau_s), time, **kwargs)
