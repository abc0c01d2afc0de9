"""`MarkovSource`: a random sparse Markov chain of order k with an exact likelihood, entropy rate and expected NLL
(see `fsdfm.data.oracle.sources` for the shared interface). Knows nothing about corpora, stages or metrics."""

from __future__ import annotations

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
    _xlogx,
    de_bruijn,
)

__all__ = ["MarkovSource"]


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


ORACLES.register("markov", MarkovSource)
