"""Synthetic oracle sources with an exactly computable likelihood.

A model trained on samples of a known source can be scored by the source itself: the per-token negative
log-likelihood of its generated samples under the source, `oracle_nll`, needs no evaluator language model, and its
floor is known (`expected_nll_per_token`, the entropy of real source sequences per token). The gap between the two
isolates the sampler's error; in particular a sampler that draws positions independently ("factorization error")
scores far above the entropy rate, because every dependency between neighbouring tokens is lost.

Two sources share the `OracleSource` interface:

* `MarkovSource` -- a random sparse Markov chain of order k over V tokens. Context c = (x_{t-k}, ..., x_{t-1}) allows
  `support` next tokens with Dirichlet-drawn probabilities P(x | c). Everything is exact: the stationary distribution
  pi over contexts, the entropy rate H = -sum_c pi(c) sum_x P(x|c) log P(x|c), and
  E[-log p(x_{0:L})] / L = (H(pi) + (L - k) H) / L.
* `HMMSource` -- a hidden Markov model with S hidden states, dense transitions and sparse-ish emissions.
  log p(x) is exact (scaled forward algorithm); the entropy rate and the expected NLL have no closed form and are
  Monte Carlo estimates with a standard error (`OracleEstimate`).

Sequences are stationary: they start from the stationary distribution (over contexts, resp. hidden states), so every
position has the same marginal law and the expected NLL per token is the same for every window of the process.

Tokens are numpy int64 arrays of shape (n, L); torch tensors are accepted wherever tokens are read.
Sources are created by name through `ORACLES` / `make_oracle("markov", vocab_size=..., ...)`.

This module holds the interface, the shared numerics and the registry; the sources live in
`fsdfm.data.oracle.markov` and `fsdfm.data.oracle.hmm` (they register themselves). It knows nothing about corpora,
stages or metrics.
"""

from __future__ import annotations

import abc
import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsdfm.registry import Registry

__all__ = [
    "ORACLES",
    "OracleEstimate",
    "OracleSource",
    "de_bruijn",
    "make_oracle",
    "oracle_nll",
]


@dataclass(frozen=True)
class OracleEstimate:
    """A per-token quantity in nats: exact (stderr 0, n_samples 0) or a Monte Carlo mean with its standard error.

    `float(est)` gives the value, so an estimate can be used wherever a number is expected.
    """

    value: float
    stderr: float
    exact: bool
    n_samples: int

    def __float__(self) -> float:
        return float(self.value)


def _as_token_array(tokens: Any) -> np.ndarray:
    """Tokens (n, L) from a numpy array, a (CPU or CUDA) torch tensor or nested lists -> int64 numpy array."""
    if hasattr(tokens, "detach"):  # a torch tensor; duck-typed so that this module does not import torch
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must have shape (n, L); got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"tokens must hold at least one sequence of at least one token; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids; got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _xlogx(p: np.ndarray) -> np.ndarray:
    """Elementwise p log p with the convention 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _cumulative(probs: np.ndarray) -> np.ndarray:
    """Row-wise cumulative probabilities, normalised so the last column is exactly 1.0.

    Then a uniform u in [0, 1) always lands on a category with positive mass (no rounding spill-over onto a
    trailing zero-probability category)."""
    cum = np.cumsum(probs, axis=-1)
    return cum / cum[..., -1:]


def _categorical(rng: np.random.Generator, cum: np.ndarray) -> np.ndarray:
    """One draw per row of `cum` (n, K) from `_cumulative`: the first k with u < cum[k], u ~ U[0, 1)."""
    u = rng.random(cum.shape[0])
    return (cum <= u[:, None]).sum(axis=1)


def _categorical_1d(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """n draws from one distribution probs (K,), by binary search in its cumulative sum."""
    return np.searchsorted(_cumulative(probs), rng.random(n), side="right")


def _dirichlet_rows(rng: np.random.Generator, n_rows: int, k: int, concentration: float) -> np.ndarray:
    """n_rows independent Dirichlet(concentration * 1_k) draws, shape (n_rows, k), float64."""
    if k == 1:
        return np.ones((n_rows, 1))
    return rng.dirichlet(np.full(k, float(concentration)), size=n_rows)


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_epsilon(epsilon: Any) -> float:
    if not (isinstance(epsilon, (int, float)) and 0.0 <= float(epsilon) < 1.0):
        raise ValueError(f"epsilon must be a number in [0, 1); got {epsilon!r}")
    return float(epsilon)


def _check_concentration(name: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and float(value) > 0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


class OracleSource(abc.ABC):
    """A distribution over token sequences with exact log-probabilities.

    Subclasses implement `sample`, `log_prob`, `expected_nll_per_token` and `entropy_rate`; the base class checks
    token ids and derives the per-token NLL.
    """

    vocab_size: int

    @abc.abstractmethod
    def sample(self, n: int, seq_len: int, seed: int) -> np.ndarray:
        """n stationary sequences of length seq_len: int64 array (n, seq_len). Same seed -> same samples."""

    @abc.abstractmethod
    def log_prob(self, tokens: Any) -> np.ndarray:
        """Exact log p(x_0, ..., x_{L-1}) of each row of tokens (n, L): float64 array (n,); -inf if impossible."""

    @abc.abstractmethod
    def expected_nll_per_token(self, seq_len: int) -> OracleEstimate:
        """E[-log p(x_{0:L})] / L over stationary sequences of length L = seq_len, in nats per token."""

    @property
    @abc.abstractmethod
    def entropy_rate(self) -> OracleEstimate:
        """lim_{t->inf} H(x_t | x_{<t}) in nats per token."""

    @property
    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The keyword config that rebuilds this source with `make_oracle(kind, **config)` (with `kind`)."""

    def nll_per_token(self, tokens: Any) -> float:
        """-sum_i log p(x^i) / (n L) over the n rows of tokens (n, L); inf if any row is impossible."""
        arr = self.check_tokens(tokens)
        return float(-self.log_prob(arr).sum() / arr.size)

    def check_tokens(self, tokens: Any) -> np.ndarray:
        """Validate tokens (n, L) and return them as int64; an id outside [0, vocab_size) raises ValueError."""
        arr = _as_token_array(tokens)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"invalid token id {int(arr[row, col])} at (sample {row}, position {col}): "
                f"{type(self).__name__} has vocab_size {self.vocab_size} (valid ids 0..{self.vocab_size - 1})"
            )
        return arr


def de_bruijn(alphabet: int, order: int) -> np.ndarray:
    """A de Bruijn sequence B(alphabet, order): length alphabet**order, every word of length `order` over
    {0..alphabet-1} appears exactly once as a cyclic window. Built by concatenating, in lexicographic order, the
    Lyndon words whose length divides `order` (Fredricksen-Kessler-Maiorana)."""
    out: list[int] = []
    a = [0] * (order + 1)

    def visit(t: int, p: int) -> None:
        if t > order:
            if order % p == 0:
                out.extend(a[1 : p + 1])
            return
        a[t] = a[t - p]
        visit(t + 1, p)
        for j in range(a[t - p] + 1, alphabet):
            a[t] = j
            visit(t + 1, t)

    visit(1, 1)
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# Registry and metric
# --------------------------------------------------------------------------------------------------------------

ORACLES: Registry = Registry("oracle source")


def make_oracle(kind: str, **cfg: Any) -> OracleSource:
    """Build the oracle source registered as `kind` from keyword config; an unknown key raises a clear TypeError."""
    factory = ORACLES.get(kind)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise TypeError(
            f"oracle source {kind!r}: unknown config key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(params)}"
        )
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in cfg]
    if missing:
        raise TypeError(f"oracle source {kind!r}: missing config key(s) {', '.join(map(repr, missing))}")
    return factory(**cfg)


def oracle_nll(tokens: Any, source: OracleSource) -> float:
    """Exact per-token NLL of generated samples under the source, -sum_i log p(x^i) / (n L), in nats.

    tokens: (n, L) ids (numpy or torch). Compare with `source.expected_nll_per_token(L)` (real data's value):
    the excess is the sampler's and model's error. inf when a sample is impossible under a sparse source.
    """
    return source.nll_per_token(tokens)
