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
    "HMMSource",
    "MarkovSource",
    "ORACLES",
    "OracleEstimate",
    "OracleSource",
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


# --------------------------------------------------------------------------------------------------------------
# Markov chain of order k
# --------------------------------------------------------------------------------------------------------------


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


class MarkovSource(OracleSource):
    """A random sparse Markov chain of order k = `order` over V = `vocab_size` tokens.

    Contexts are the k previous tokens, indexed base V with the oldest token most significant:
    c = sum_j x_{t-k+j} V^{k-1-j}, so C = V^k contexts and the next context is (c mod V^{k-1}) V + x.

    Construction (numpy Generator seeded with `seed`):
      * Irreducibility by construction: a de Bruijn sequence B(V, k), relabelled by a random token permutation, gives
        every context one "backbone" next token such that the backbone transitions alone visit all C contexts in one
        cycle. Each context allows its backbone token plus `support - 1` other tokens drawn uniformly without
        replacement; probabilities over the allowed set ~ Dirichlet(concentration).
        So the context chain is irreducible for every support >= 1 and its stationary distribution pi is unique.
        (With support = 1 the chain is a deterministic cycle through every context: pi is uniform, H = 0.)
      * Aperiodicity is not needed: sequences start from pi itself, so the process is stationary even for a periodic
        chain. pi is computed by power iteration on the lazy chain (I + P) / 2, which has the same fixed point as P
        and is aperiodic, so the iteration converges for every irreducible P.
      * `epsilon` > 0 mixes the uniform distribution into every row, P = (1 - epsilon) Q + epsilon / V, so that no
        sequence has probability 0 (a finite score for arbitrary model samples). epsilon = 0 (default) keeps the
        chain exactly sparse; log_prob is then -inf for sequences with a disallowed transition.

    Shapes: `next_tokens` (C, support) int64 allowed next tokens, `next_probs` (C, support) their probabilities
    under Q, `stationary` (C,) pi over contexts.
    """

    max_contexts = 1 << 22  # C * support tables in memory; V^k beyond this is a configuration mistake

    def __init__(
        self,
        vocab_size: int,
        order: int = 1,
        support: int = 4,
        seed: int = 0,
        concentration: float = 1.0,
        epsilon: float = 0.0,
    ):
        self.vocab_size = _check_positive_int("vocab_size", vocab_size, 2)
        self.order = _check_positive_int("order", order, 1)
        self.support = _check_positive_int("support", support, 1)
        if self.support > self.vocab_size:
            raise ValueError(f"support must be <= vocab_size ({self.vocab_size}); got {support}")
        self.seed = int(seed)
        self.concentration = _check_concentration("concentration", concentration)
        self.epsilon = _check_epsilon(epsilon)
        self.n_contexts = self.vocab_size**self.order
        if self.n_contexts > self.max_contexts:
            raise ValueError(
                f"vocab_size**order = {self.vocab_size}**{self.order} = {self.n_contexts} contexts exceeds the limit "
                f"{self.max_contexts}; use a smaller vocabulary or order"
            )

        rng = np.random.default_rng(self.seed)
        V, k, C, s = self.vocab_size, self.order, self.n_contexts, self.support
        self.next_tokens = self._draw_support(rng, V, k, C, s)
        self.next_probs = _dirichlet_rows(rng, C, s, self.concentration)
        self.stationary = self._stationary()

    # --- construction ---------------------------------------------------------------------------------------

    @staticmethod
    def _draw_support(rng: np.random.Generator, V: int, k: int, C: int, s: int) -> np.ndarray:
        """Allowed next tokens (C, s): column 0 the de Bruijn backbone, then s-1 distinct other tokens per row."""
        relabel = rng.permutation(V)
        seq = relabel[de_bruijn(V, k)]
        cyc = np.concatenate([seq, seq[:k]])
        ctx = np.zeros(C, dtype=np.int64)
        for j in range(k):
            ctx = ctx * V + cyc[j : j + C]
        backbone = np.empty(C, dtype=np.int64)
        backbone[ctx] = cyc[k : k + C]
        allowed = np.empty((C, s), dtype=np.int64)
        allowed[:, 0] = backbone
        if s > 1:
            # Random keys with the backbone's key forced to +inf: the s-1 smallest keys are a uniform subset of the
            # other V-1 tokens. Chunked so the (rows, V) key matrix stays small.
            chunk = max(1, (1 << 22) // V)
            for lo in range(0, C, chunk):
                hi = min(C, lo + chunk)
                keys = rng.random((hi - lo, V))
                keys[np.arange(hi - lo), backbone[lo:hi]] = np.inf
                allowed[lo:hi, 1:] = np.argpartition(keys, s - 2, axis=1)[:, : s - 1]
        return allowed

    def _transition(self, dist: np.ndarray) -> np.ndarray:
        """One step of the context chain: dist (C,) -> dist P (C,)."""
        V, C = self.vocab_size, self.n_contexts
        if not hasattr(self, "_dest"):
            # Destination context of every allowed transition: (c mod V^{k-1}) * V + x, flattened like next_probs.
            self._dest = ((np.arange(C) % (C // V) * V)[:, None] + self.next_tokens).ravel()
        out = np.bincount(self._dest, ((1.0 - self.epsilon) * dist[:, None] * self.next_probs).ravel(), C)
        if self.epsilon > 0:
            # Uniform share: mass of every shifted prefix, spread over its V successors.
            prefix_mass = dist.reshape(V, C // V).sum(axis=0)
            out += np.repeat(prefix_mass * self.epsilon / V, V)
        return out

    def dense_transition(self) -> np.ndarray:
        """The context chain's transition matrix (C, C): P[c, (c mod V^{k-1}) V + x] = P(x | c). Small C only."""
        V, C = self.vocab_size, self.n_contexts
        P = np.zeros((C, C))
        if self.epsilon > 0:
            shifted = np.arange(C) % (C // V) * V
            P[np.arange(C)[:, None], shifted[:, None] + np.arange(V)] = self.epsilon / V
        self._transition(np.zeros(C))  # builds self._dest
        rows = np.repeat(np.arange(C), self.support)
        np.add.at(P, (rows, self._dest), (1 - self.epsilon) * self.next_probs.ravel())
        return P

    def _dense_stationary(self) -> np.ndarray:
        """Exact pi: solve pi (P - I) = 0 with one equation replaced by sum(pi) = 1 (unique for irreducible P)."""
        C = self.n_contexts
        system = self.dense_transition().T - np.eye(C)
        system[-1] = 1.0
        rhs = np.zeros(C)
        rhs[-1] = 1.0
        pi = np.clip(np.linalg.solve(system, rhs), 0.0, None)
        return pi / pi.sum()

    def _power_stationary(self, tol: float = 1e-14, max_iter: int = 20_000) -> tuple[np.ndarray, float]:
        """pi by power iteration on the lazy chain (I + P) / 2 -- the same fixed point as P, and aperiodic, so the
        iteration converges for every irreducible P. Returns pi and its residual |pi P - pi|_1."""
        C = self.n_contexts
        pi = np.full(C, 1.0 / C)
        for _ in range(max_iter):
            new = 0.5 * (pi + self._transition(pi))
            new /= new.sum()
            done = np.abs(new - pi).sum() < tol
            pi = new
            if done:
                break
        return pi, float(np.abs(self._transition(pi) - pi).sum())

    def _stationary(self) -> np.ndarray:
        """pi (C,) with pi P = pi: exact linear solve for C <= 1024 (or when power iteration stalls and C <= 4096),
        power iteration on the lazy chain otherwise (residual checked)."""
        C = self.n_contexts
        if self.support == 1 and self.epsilon == 0:
            return np.full(C, 1.0 / C)  # the backbone cycle visits every context once per period
        if C <= 1024:
            return self._dense_stationary()
        pi, residual = self._power_stationary()
        if residual <= 1e-12:
            return pi
        if C <= 4096:
            return self._dense_stationary()
        raise RuntimeError(
            f"MarkovSource(vocab_size={self.vocab_size}, order={self.order}, support={self.support}, "
            f"concentration={self.concentration}, seed={self.seed}): the chain mixes too slowly for power iteration "
            f"over its {C} contexts (residual {residual:.2e}); raise concentration or support, or lower the order"
        )

    # --- helpers --------------------------------------------------------------------------------------------

    def _context_tokens(self, ctx: np.ndarray) -> np.ndarray:
        """Context indices (n,) -> their k tokens (n, k), oldest first."""
        V, k = self.vocab_size, self.order
        digits = np.empty((ctx.shape[0], k), dtype=np.int64)
        rest = ctx.copy()
        for j in range(k - 1, -1, -1):
            digits[:, j] = rest % V
            rest //= V
        return digits

    def _prefix_marginal(self, length: int) -> np.ndarray:
        """pi marginalised to its first `length` tokens (length <= k): shape (V^length,), same base-V indexing."""
        V, k = self.vocab_size, self.order
        return self.stationary.reshape(V**length, V ** (k - length)).sum(axis=1)

    def next_token_probs(self, ctx: np.ndarray) -> np.ndarray:
        """Dense P(. | c) for context indices ctx (n,): float64 (n, V). For tests and small vocabularies."""
        ctx = np.asarray(ctx, dtype=np.int64)
        out = np.full((ctx.shape[0], self.vocab_size), self.epsilon / self.vocab_size)
        rows = np.arange(ctx.shape[0])[:, None]
        np.add.at(out, (rows, self.next_tokens[ctx]), (1 - self.epsilon) * self.next_probs[ctx])
        return out

    # --- OracleSource ---------------------------------------------------------------------------------------

    def sample(self, n: int, seq_len: int, seed: int) -> np.ndarray:
        n = _check_positive_int("n", n)
        seq_len = _check_positive_int("seq_len", seq_len)
        rng = np.random.default_rng(seed)
        V, k, C = self.vocab_size, self.order, self.n_contexts
        out = np.empty((n, max(seq_len, k)), dtype=np.int64)
        ctx = _categorical_1d(rng, self.stationary, n)
        out[:, :k] = self._context_tokens(ctx)
        cum = _cumulative(self.next_probs)
        for t in range(k, seq_len):
            x = self.next_tokens[ctx, _categorical(rng, cum[ctx])]
            if self.epsilon > 0:
                uniform = rng.random(n) < self.epsilon
                x = np.where(uniform, rng.integers(0, V, size=n), x)
            out[:, t] = x
            ctx = ctx % (C // V) * V + x
        return out[:, :seq_len]

    def log_prob(self, tokens: Any) -> np.ndarray:
        """log pi(x_{0:k}) + sum_{t >= k} log P(x_t | x_{t-k:t}); for L < k the marginal of pi on x_{0:L}."""
        x = self.check_tokens(tokens)
        n, L = x.shape
        V, k, C = self.vocab_size, self.order, self.n_contexts
        head = min(L, k)
        ctx = np.zeros(n, dtype=np.int64)
        for j in range(head):
            ctx = ctx * V + x[:, j]
        start = self.stationary if head == k else self._prefix_marginal(head)
        with np.errstate(divide="ignore"):
            logp = np.log(start[ctx])
            for t in range(k, L):
                hit = self.next_tokens[ctx] == x[:, t, None]
                p = (1 - self.epsilon) * (self.next_probs[ctx] * hit).sum(axis=1) + self.epsilon / V
                logp += np.log(p)
                ctx = ctx % (C // V) * V + x[:, t]
        return logp

    @property
    def entropy_rate(self) -> OracleEstimate:
        """Exact H = -sum_c pi(c) sum_x P(x|c) log P(x|c) (nats per token)."""
        V, s, eps = self.vocab_size, self.support, self.epsilon
        p_support = (1 - eps) * self.next_probs + eps / V
        h_ctx = -_xlogx(p_support).sum(axis=1)
        if eps > 0:
            h_ctx -= (V - s) * float(_xlogx(np.array(eps / V)))
        return OracleEstimate(float(self.stationary @ h_ctx), 0.0, True, 0)

    def start_entropy(self, length: int | None = None) -> float:
        """H of the first min(length, k) tokens of a stationary sequence (H(pi) for length >= k), in nats."""
        head = self.order if length is None else min(length, self.order)
        return float(-_xlogx(self._prefix_marginal(head)).sum())

    def expected_nll_per_token(self, seq_len: int) -> OracleEstimate:
        """Exact (H(pi) + (L - k) H) / L for L >= k (stationarity: every transition contributes H);
        H(first L tokens) / L for L < k."""
        L = _check_positive_int("seq_len", seq_len)
        total = self.start_entropy(L) + max(L - self.order, 0) * self.entropy_rate.value
        return OracleEstimate(total / L, 0.0, True, 0)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "order": self.order,
            "support": self.support,
            "seed": self.seed,
            "concentration": self.concentration,
            "epsilon": self.epsilon,
        }

    def __repr__(self) -> str:
        return "MarkovSource(" + ", ".join(f"{k}={v!r}" for k, v in self.config.items()) + ")"


# --------------------------------------------------------------------------------------------------------------
# Hidden Markov model
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Registry and metric
# --------------------------------------------------------------------------------------------------------------

ORACLES: Registry = Registry("oracle source")
ORACLES.register("markov", MarkovSource)
ORACLES.register("hmm", HMMSource)


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
