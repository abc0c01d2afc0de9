"""The exact joint sampler of an oracle source: the zero-error floor of few-step sampling.

A product sampler (every rule of `fsdfm.samplers`) draws the positions of one step independently from the exact
marginals p_{1|t}(x_1^i | x_t), and so loses the dependence between positions (factorization error), whatever the
denoiser. This sampler instead draws x_1 jointly from the exact posterior p(x_1 | x_t) by forward filtering, backward
sampling (FFBS) over the source's latent chain (`fsdfm.oracle_posterior` documents the evidence factors and the
chain), then moves every position along the path's own bridge given x_1:

    x_{t+h}^i = x_1^i                 with probability 1 - r,  r = (1 - kappa(t + h)) / (1 - kappa(t)),
    x_{t+h}^i = x_t^i                 otherwise                (positions already at x_1^i stay),

and on the last step x = x_1. Given x_1 the mixture path is the process in which each position jumps once, to
x_1^i, at the rate kappa' / (1 - kappa) (its time-t law is kappa delta_{x_1} + (1 - kappa) p_0, the path's), so if
x_t has the path's law at t, (x_t, x_1, x_{t+h}) has the path's joint law and x_{t+h} its law at t + h. By induction
the output is an exact draw from the source at any budget, one step included: its oracle NLL estimates H_L.

FFBS, order-k Markov source (latent state c_i = the last k tokens, as in `oracle_posterior`): the forward messages
alpha_m(c) = P(c_{k-1+m} = c | evidence up to there) (normalised), then c_last ~ alpha_last and, backwards, with
c_m = (s, x): c_{m-1} = (a, s) with a ~ alpha_{m-1}(a, s) P(x | (a, s)). HMM: h_{L-1} ~ alpha_{L-1},
h_i ~ alpha_i(h) A[h, h_{i+1}], then x^i ~ B[h_i, v] e_i(v). Cost per step: the forward pass's B C V.
"""

from __future__ import annotations

import time

import torch

from fsdfm.data.oracle import HMMSource, MarkovSource, OracleSource
from fsdfm.oracle_posterior import _markov_tables, _normalise, evidence
from fsdfm.paths import MixturePath
from fsdfm.samplers import SampleOutput

__all__ = ["joint_posterior_sample", "sample_joint"]


def _categorical(w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of non-negative weights w (B, K) -> (B,) long. A row of zeros (impossible evidence)
    draws uniformly."""
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    return torch.multinomial(w, 1, generator=generator).squeeze(-1)


def _markov_ffbs(src: MarkovSource, e: torch.Tensor, generator) -> torch.Tensor:
    B, L, V = e.shape
    k, C = src.order, src.n_contexts
    if L < k:
        raise ValueError(f"the exact joint sampler of an order-{k} Markov source needs seq_len >= {k}; got {L}")
    pi, T = _markov_tables(src, e.dtype, e.device)
    S = C // V
    T3 = T.view(V, S, V)
    e0 = torch.ones((B, C), dtype=e.dtype, device=e.device)
    for j in range(k):
        e0 = (e0.view(B, V**j, V, V ** (k - 1 - j)) * e[:, j].view(B, 1, V, 1)).view(B, C)
    n = L - k + 1
    alpha = torch.empty((n, B, C), dtype=e.dtype, device=e.device)
    alpha[0] = _normalise(pi * e0)[0]
    for m in range(1, n):
        pred = torch.einsum("bas,asx->bsx", alpha[m - 1].view(B, V, S), T3)
        alpha[m] = _normalise(pred * e[:, k - 1 + m].view(B, 1, V))[0].reshape(B, C)
    x = torch.empty((B, L), dtype=torch.long, device=e.device)
    rows = torch.arange(B, device=e.device)
    c = _categorical(alpha[n - 1], generator)  # the last context
    for m in range(n - 1, 0, -1):
        s, newest = c // V, c % V  # c_m = (s, x): s its V^{k-1} older digits
        x[:, k - 1 + m] = newest
        # c_{m-1} = (a, s): a ~ alpha_{m-1}(a, s) P(x | (a, s))
        w = alpha[m - 1].view(B, V, S)[rows, :, s] * T3[:, s, newest].T
        c = _categorical(w, generator) * S + s
    for j in range(k):  # the k digits of c_{k-1}, oldest first
        x[:, j] = (c // V ** (k - 1 - j)) % V
    return x


def _hmm_ffbs(src: HMMSource, e: torch.Tensor, generator) -> torch.Tensor:
    B, L, V = e.shape
    A = torch.as_tensor(src.transition, dtype=e.dtype, device=e.device)
    Bm = torch.as_tensor(src.emission, dtype=e.dtype, device=e.device)
    pi = torch.as_tensor(src.stationary, dtype=e.dtype, device=e.device)
    E = torch.einsum("blv,hv->blh", e, Bm)
    alpha = torch.empty((L, B, src.n_states), dtype=e.dtype, device=e.device)
    alpha[0] = _normalise(pi * E[:, 0])[0]
    for i in range(1, L):
        alpha[i] = _normalise((alpha[i - 1] @ A) * E[:, i])[0]
    hidden = torch.empty((B, L), dtype=torch.long, device=e.device)
    hidden[:, L - 1] = _categorical(alpha[L - 1], generator)
    for i in range(L - 2, -1, -1):
        hidden[:, i] = _categorical(alpha[i] * A[:, hidden[:, i + 1]].T, generator)
    # x^i | h_i, x_t^i  proportional to  B[h_i, v] e_i(v)
    w = Bm[hidden] * e  # (B, L, V)
    return _categorical(w.reshape(B * L, V), generator).view(B, L)


def joint_posterior_sample(
    oracle: OracleSource, x_t: torch.Tensor, kappa: torch.Tensor, source: str, generator=None
) -> torch.Tensor:
    """One joint draw x_1 ~ p(x_1 | x_t) per row (FFBS, module docstring).

    Args:
        oracle: a MarkovSource (any order) or an HMMSource.  x_t: (B, L) long states (mask id V under the mask source).
        kappa: (B,) kappa(t) per row (or a scalar).  source: "mask" or "uniform".  generator: the draws' generator.
    Returns:
        (B, L) long, each row an exact draw from the source conditioned on the row's x_t.
    """
    kappa = torch.as_tensor(kappa, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
    e = evidence(x_t, kappa, oracle.vocab_size, source, torch.float64)
    if isinstance(oracle, MarkovSource):
        return _markov_ffbs(oracle, e, generator)
    if isinstance(oracle, HMMSource):
        return _hmm_ffbs(oracle, e, generator)
    raise TypeError(f"no exact joint sampler for {type(oracle).__name__}")


@torch.no_grad()
def sample_joint(
    oracle: OracleSource,
    path: MixturePath,
    *,
    n_samples: int,
    seq_len: int,
    grid: torch.Tensor,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> SampleOutput:
    """n_samples exact draws from the source by the joint sampler on `grid` (module docstring); NFE = steps (one
    joint posterior per step), wall_s the sampling time."""
    device = torch.device(device)
    grid = grid.to(device=device, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("time grid must be a 1-D increasing tensor with at least 2 points")
    batch_size = batch_size or n_samples
    n_steps = grid.numel() - 1
    chunks, wall = [], 0.0
    for start in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - start)
        x = path.source.sample((B, seq_len), generator=generator, device=device)
        t0 = time.perf_counter()
        for i in range(n_steps):
            t = grid[i].expand(B)
            x_1 = joint_posterior_sample(oracle, x, path.scheduler.kappa(t), path.source.name, generator)
            if i == n_steps - 1:
                x = x_1
                break
            r = path.scheduler.survival_ratio(t, (grid[i + 1] - grid[i]).expand(B))[:, None]
            u = torch.rand((B, seq_len), dtype=torch.float64, device=device, generator=generator)
            x = torch.where(u >= r, x_1, x)  # positions already at x_1 stay either way
        wall += time.perf_counter() - t0
        chunks.append(x)
    return SampleOutput(tokens=torch.cat(chunks).cpu(), nfe=n_steps, time_grid=grid.cpu(), wall_s=wall)
