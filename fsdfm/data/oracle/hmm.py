"""`HMMSource`: a random hidden Markov model with an exact likelihood (scaled forward algorithm) and Monte Carlo
entropy rate / expected NLL (see `fsdfm.data.oracle.sources`). Knows nothing about corpora, stages or metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fsdfm.data.oracle.sources import (
    ORACLES,
    OracleEstimate,
    OracleSource,
    _categorical,
    _categorical_1d,
    _check_concentration,
    _check_epsilon,
    _check_positive_int,
    _cumulative,
    _dirichlet_rows,
)

__all__ = ["HMMSource"]


class HMMSource(OracleSource):
    """A random hidden Markov model: S = `n_states` hidden states, V = `vocab_size` tokens.

    * Transitions A (S, S): rows ~ Dirichlet(transition_concentration), dense, so the hidden chain is irreducible and
      aperiodic; the stationary hidden distribution pi solves pi A = pi exactly (linear solve).
    * Emissions B (S, V): each state emits `emission_support` tokens (default max(2, V // 4)) drawn uniformly without
      replacement, probabilities ~ Dirichlet(emission_concentration); `epsilon` mixes in the uniform distribution.
    * h_0 ~ pi, x_t ~ B[h_t], h_{t+1} ~ A[h_t]: a stationary process.

    log p(x) is exact (scaled forward algorithm). The entropy rate and the expected NLL have no closed form:
    they are Monte Carlo estimates from `mc_samples` sequences sampled with `mc_seed` (default seed + 1), returned as
    `OracleEstimate(value, stderr)` with the standard error over independent sequences, and cached.
    Entropy rate estimator: the mean of -log p(x_t | x_{<t}) over positions mc_burn_in <= t < mc_len of each sequence
    (Shannon-McMillan-Breiman; H(x_t | x_{<t}) decreases to the rate, so the burn-in leaves an upward bias that
    vanishes geometrically with the hidden chain's forgetting).
    """

    def __init__(
        self,
        vocab_size: int,
        n_states: int = 8,
        seed: int = 0,
        emission_support: int | None = None,
        transition_concentration: float = 0.5,
        emission_concentration: float = 1.0,
        epsilon: float = 0.0,
        mc_samples: int = 1024,
        mc_len: int = 256,
        mc_burn_in: int = 64,
        mc_seed: int | None = None,
    ):
        self.vocab_size = _check_positive_int("vocab_size", vocab_size, 2)
        self.n_states = _check_positive_int("n_states", n_states, 1)
        self.seed = int(seed)
        V, S = self.vocab_size, self.n_states
        if emission_support is None:
            emission_support = max(2, V // 4)
        self.emission_support = _check_positive_int("emission_support", emission_support)
        if self.emission_support > V:
            raise ValueError(f"emission_support must be <= vocab_size ({V}); got {emission_support}")
        self.transition_concentration = _check_concentration("transition_concentration", transition_concentration)
        self.emission_concentration = _check_concentration("emission_concentration", emission_concentration)
        self.epsilon = _check_epsilon(epsilon)
        self.mc_samples = _check_positive_int("mc_samples", mc_samples, 2)
        self.mc_len = _check_positive_int("mc_len", mc_len)
        self.mc_burn_in = _check_positive_int("mc_burn_in", mc_burn_in, 0)
        if self.mc_burn_in >= self.mc_len:
            raise ValueError(f"mc_burn_in ({mc_burn_in}) must be < mc_len ({mc_len})")
        self.mc_seed = self.seed + 1 if mc_seed is None else int(mc_seed)

        rng = np.random.default_rng(self.seed)
        self.transition = _dirichlet_rows(rng, S, S, self.transition_concentration)
        s = self.emission_support
        allowed = np.argpartition(rng.random((S, V)), s - 1, axis=1)[:, :s] if s < V else np.tile(np.arange(V), (S, 1))
        emission = np.zeros((S, V))
        np.put_along_axis(emission, allowed, _dirichlet_rows(rng, S, s, self.emission_concentration), axis=1)
        self.emission = (1 - self.epsilon) * emission + self.epsilon / V
        self.stationary = self._stationary()
        self._nll_cache: dict[int, OracleEstimate] = {}
        self._rate: OracleEstimate | None = None

    def _stationary(self) -> np.ndarray:
        """pi (S,) solving pi (A - I) = 0, sum pi = 1 (least squares on the stacked system; exact for irreducible A)."""
        S = self.n_states
        system = np.vstack([self.transition.T - np.eye(S), np.ones((1, S))])
        rhs = np.zeros(S + 1)
        rhs[-1] = 1.0
        pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
        pi = np.clip(pi, 0.0, None)
        return pi / pi.sum()

    def sample(self, n: int, seq_len: int, seed: int) -> np.ndarray:
        n = _check_positive_int("n", n)
        seq_len = _check_positive_int("seq_len", seq_len)
        rng = np.random.default_rng(seed)
        cum_a = _cumulative(self.transition)
        cum_b = _cumulative(self.emission)
        h = _categorical_1d(rng, self.stationary, n)
        out = np.empty((n, seq_len), dtype=np.int64)
        for t in range(seq_len):
            out[:, t] = _categorical(rng, cum_b[h])
            h = _categorical(rng, cum_a[h])
        return out

    def _forward_log_terms(self, x: np.ndarray) -> np.ndarray:
        """log p(x_t | x_{<t}) for every position, shape (n, L), by the scaled forward algorithm:
        alpha_0 = pi * B[:, x_0]; alpha_t = (alpha_{t-1} A) * B[:, x_t]; c_t = sum(alpha_t) = p(x_t | x_{<t});
        alpha_t /= c_t. A row with some c_t = 0 is impossible: that term is -inf, so its sum is -inf."""
        n, L = x.shape
        terms = np.empty((n, L))
        pred = np.broadcast_to(self.stationary, (n, self.n_states))  # p(h_t | x_{<t})
        for t in range(L):
            alpha = pred * self.emission[:, x[:, t]].T
            c = alpha.sum(axis=1)
            with np.errstate(divide="ignore"):
                terms[:, t] = np.log(c)
            dead = c <= 0
            # After a zero-probability token the belief restarts from pi, so no NaN spreads through 0 / 0.
            alpha = np.where(dead[:, None], self.stationary, alpha / np.where(dead, 1.0, c)[:, None])
            pred = alpha @ self.transition
        return terms

    def log_prob(self, tokens: Any) -> np.ndarray:
        """Exact log p(x_{0:L}) = sum_t log c_t of the scaled forward algorithm, shape (n,)."""
        x = self.check_tokens(tokens)
        return self._forward_log_terms(x).sum(axis=1)

    def expected_nll_per_token(self, seq_len: int) -> OracleEstimate:
        """Monte Carlo: mean of -log p(x)/L over mc_samples sampled sequences, with the standard error."""
        L = _check_positive_int("seq_len", seq_len)
        if L not in self._nll_cache:
            x = self.sample(self.mc_samples, L, seed=self.mc_seed)
            per_seq = -self.log_prob(x) / L
            self._nll_cache[L] = OracleEstimate(
                float(per_seq.mean()), float(per_seq.std(ddof=1) / math.sqrt(len(per_seq))), False, len(per_seq)
            )
        return self._nll_cache[L]

    @property
    def entropy_rate(self) -> OracleEstimate:
        """Monte Carlo: mean of -log p(x_t | x_{<t}) over t in [mc_burn_in, mc_len), standard error over sequences."""
        if self._rate is None:
            x = self.sample(self.mc_samples, self.mc_len, seed=self.mc_seed)
            per_seq = -self._forward_log_terms(x)[:, self.mc_burn_in :].mean(axis=1)
            self._rate = OracleEstimate(
                float(per_seq.mean()), float(per_seq.std(ddof=1) / math.sqrt(len(per_seq))), False, len(per_seq)
            )
        return self._rate

    @property
    def config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "n_states": self.n_states,
            "seed": self.seed,
            "emission_support": self.emission_support,
            "transition_concentration": self.transition_concentration,
            "emission_concentration": self.emission_concentration,
            "epsilon": self.epsilon,
            "mc_samples": self.mc_samples,
            "mc_len": self.mc_len,
            "mc_burn_in": self.mc_burn_in,
            "mc_seed": self.mc_seed,
        }

    def __repr__(self) -> str:
        return "HMMSource(" + ", ".join(f"{k}={v!r}" for k, v in self.config.items()) + ")"


ORACLES.register("hmm", HMMSource)
