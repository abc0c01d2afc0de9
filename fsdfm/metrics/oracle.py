"""Exact metrics of oracle sources: model error (`posterior_kl`) and an n-gram distance that collapse cannot game.

posterior_kl (nats per position): the mean over a fixed grid of t and held-out states x_t ~ p_t(. | x_1) of

    KL(p_exact(. | x_t) || p_theta(. | x_t)) = sum_v p_exact(v) [log p_exact(v) - log p_theta(v)]

at the positions that may still move (the masked ones under the mask source, all under the uniform source), with
p_exact the forward-backward posterior (fsdfm.oracle_posterior). It is the model's own error, apart from the sampler.

ngram_tv / ngram_kl: the samples' empirical n-gram distribution q (every window of n tokens of every sample,
pooled) against the source's exact stationary one p:

    TV = (1/2) sum_g |q(g) - p(g)|,    KL(q || p) = sum_g q(g) log(q(g) / p(g))    (inf if q puts mass where p = 0)

with n = order + 1 for a Markov source (p(c, x) = pi(c) P(x | c)) and n = `HMM_NGRAM` for an HMM (exact observed
n-gram marginals by the forward algorithm). A collapsed sampler can score a low oracle_nll (it repeats the likely
sequences) but not a low n-gram distance. Finite samples leave a floor: the same distance for as many true source
sequences (`ngram_floor`), which shrinks like 1 / sqrt(number of windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fsdfm.oracle import HMMSource, MarkovSource, OracleSource

__all__ = ["HMM_NGRAM", "NgramDistance", "exact_ngram", "ngram_distance", "ngram_floor", "posterior_kl",
           "POSTERIOR_KL_T_GRID"]

HMM_NGRAM = 2
POSTERIOR_KL_T_GRID = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # t = 0.05, 0.15, ..., 0.95
MAX_NGRAM_BINS = 1 << 22


@dataclass(frozen=True)
class NgramDistance:
    """tv and kl (nats) between the empirical and the exact n-gram distribution; n the n-gram length;
    n_windows the number of n-grams counted."""

    tv: float
    kl: float
    n: int
    n_windows: int


def ngram_order(source: OracleSource) -> int:
    """The n of the n-gram distance: order + 1 (Markov), HMM_NGRAM (HMM)."""
    return source.order + 1 if isinstance(source, MarkovSource) else HMM_NGRAM


def exact_ngram(source: OracleSource, n: int | None = None) -> np.ndarray:
    """The exact stationary distribution of n consecutive tokens, flattened base V (oldest most significant):
    (V^n,) float64. Markov with n = order + 1: pi(c) P(x | c). HMM: the forward algorithm
    p(g) = pi^T diag(B[:, g_0]) A diag(B[:, g_1]) ... A diag(B[:, g_{n-1}]) 1, for all g at once."""
    n = ngram_order(source) if n is None else n
    V = source.vocab_size
    if V**n > MAX_NGRAM_BINS:
        raise ValueError(f"{V}^{n} n-gram bins exceed the limit {MAX_NGRAM_BINS}")
    if isinstance(source, MarkovSource):
        if n != source.order + 1:
            raise ValueError(f"a Markov source of order {source.order} has an exact n-gram table for n = order + 1 only")
        T = np.zeros((source.n_contexts, V))
        np.put_along_axis(T, source.next_tokens, (1 - source.epsilon) * source.next_probs, axis=1)
        T += source.epsilon / V
        return (source.stationary[:, None] * T).ravel()
    if isinstance(source, HMMSource):
        # f[g, h] = p(g_0..g_j, h_j = h): start pi * B, then (f A) * B per token
        f = (source.stationary[:, None] * source.emission).T  # (V, S)
        for _ in range(n - 1):
            f = ((f @ source.transition)[:, None, :] * source.emission.T[None, :, :]).reshape(-1, source.n_states)
        return f.sum(1)
    raise TypeError(f"no exact n-gram table for {type(source).__name__}")


def ngram_counts(tokens: np.ndarray, vocab_size: int, n: int) -> np.ndarray:
    """Counts of every window of n tokens of every row of tokens (N, L), flattened base V: (V^n,) float64."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape[1] < n:
        raise ValueError(f"sequences of length {tokens.shape[1]} hold no {n}-gram")
    idx = np.zeros((tokens.shape[0], tokens.shape[1] - n + 1), dtype=np.int64)
    for j in range(n):
        idx = idx * vocab_size + tokens[:, j:tokens.shape[1] - n + 1 + j]
    return np.bincount(idx.ravel(), minlength=vocab_size**n).astype(np.float64)


def ngram_distance(tokens, source: OracleSource, n: int | None = None, exact: np.ndarray | None = None) -> NgramDistance:
    """TV and KL(empirical || exact) of the n-grams of tokens (N, L) (numpy or torch) under `source`."""
    tokens = source.check_tokens(tokens)
    n = ngram_order(source) if n is None else n
    p = exact_ngram(source, n) if exact is None else exact
    counts = ngram_counts(tokens, source.vocab_size, n)
    q = counts / counts.sum()
    tv = 0.5 * float(np.abs(q - p).sum())
    seen = q > 0
    with np.errstate(divide="ignore"):
        kl = float(np.sum(q[seen] * (np.log(q[seen]) - np.log(p[seen]))))
    return NgramDistance(tv=tv, kl=kl, n=n, n_windows=int(counts.sum()))


def ngram_floor(source: OracleSource, n_samples: int, seq_len: int, seed: int) -> NgramDistance:
    """The finite-sample floor: the n-gram distance of n_samples true source sequences (drawn with `seed`)."""
    return ngram_distance(source.sample(n_samples, seq_len, seed=seed), source)


@torch.no_grad()
def posterior_kl(model: Callable, exact: Callable, path, x_1: torch.Tensor, generator: torch.Generator,
                 t_grid: tuple = POSTERIOR_KL_T_GRID, h: float | None = None, batch_size: int = 256) -> float:
    """Mean KL(p_exact || p_theta) in nats per movable position over t in t_grid and states x_t ~ p_t(. | x_1).

    Args:
        model: f(x_t, t[, h]) -> logits (B, L, V) (h passed when not None: the student at its smallest step).
        exact: an ExactPosterior (or any f(x_t, t) -> exact logits).
        path: the MixturePath both are read on.
        x_1: (N, L) held-out clean sequences; each is noised once per t.
        generator: the noise of the path draws (fixed seed: the same states for every model).
    Returns:
        the KL averaged over every movable position of every state (float, nats).
    """
    total, count = 0.0, 0.0
    dev = x_1.device
    for t_value in t_grid:
        for s in range(0, len(x_1), batch_size):
            xb = x_1[s:s + batch_size]
            t = torch.full((len(xb),), float(t_value), device=dev)
            x_t = path.sample(xb, t, generator).x_t
            log_p = torch.log_softmax(exact(x_t, t.double()).double(), -1)
            args = (x_t, t) if h is None else (x_t, t, torch.full_like(t, float(h)))
            log_q = torch.log_softmax(model(*args).double(), -1)
            p = log_p.exp()
            kl = (p * (log_p - log_q)).sum(-1)  # exp(log_p) = 0 at impossible tokens: no contribution
            w = path.source.movable(x_t).double()
            total += float((kl * w).sum())
            count += float(w.sum())
    return total / max(count, 1.0)
