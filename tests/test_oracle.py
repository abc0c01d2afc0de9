"""Oracle sources: exact likelihoods checked against brute-force enumeration and hand formulas."""

import itertools
import math

import numpy as np
import pytest
import torch

from fsdfm.data.oracle import (
    ORACLES,
    HMMSource,
    MarkovSource,
    OracleEstimate,
    de_bruijn,
    make_oracle,
    oracle_nll,
)
from fsdfm.registry import UnknownNameError


def all_sequences(V: int, L: int) -> np.ndarray:
    return np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64)


def dense_table(m: MarkovSource) -> np.ndarray:
    """P(x | c) as a dense (C, V) table, built with plain loops from the sparse tables."""
    table = np.zeros((m.n_contexts, m.vocab_size))
    for c in range(m.n_contexts):
        for x, p in zip(m.next_tokens[c], m.next_probs[c]):
            table[c, x] += (1 - m.epsilon) * p
    return table + m.epsilon / m.vocab_size


def eig_stationary(P: np.ndarray) -> np.ndarray:
    """Left eigenvector of P for eigenvalue 1, normalised (independent of the source's own solver)."""
    w, v = np.linalg.eig(P.T)
    vec = np.real(v[:, np.argmin(np.abs(w - 1))])
    return vec / vec.sum()


def brute_markov_prob(m: MarkovSource, seq: np.ndarray, table: np.ndarray, pi: np.ndarray) -> float:
    """p(x) = pi(x_{0:k}) prod_t P(x_t | x_{t-k:t}) for len(seq) >= k, by direct indexing."""
    V, k = m.vocab_size, m.order
    ctx = 0
    for j in range(k):
        ctx = ctx * V + int(seq[j])
    p = pi[ctx]
    for t in range(k, len(seq)):
        p *= table[ctx, seq[t]]
        ctx = ctx % (V ** (k - 1)) * V + int(seq[t])
    return p


# ------------------------------------------------------------------------------------------------ Markov ----


def test_de_bruijn_every_window_once():
    for V, k in [(2, 3), (3, 3), (5, 2), (4, 1)]:
        seq = de_bruijn(V, k)
        assert len(seq) == V**k
        cyc = np.concatenate([seq, seq[: k - 1]])
        windows = {tuple(cyc[i : i + k]) for i in range(V**k)}
        assert len(windows) == V**k


@pytest.mark.parametrize("order", [1, 2])
def test_deterministic_chain(order):
    V, L = 5, 12
    m = MarkovSource(vocab_size=V, order=order, support=1, seed=3)
    assert m.entropy_rate == OracleEstimate(0.0, 0.0, True, 0)
    # Only the start context carries information: uniform pi over V^k contexts.
    assert m.expected_nll_per_token(L).value == pytest.approx(order * math.log(V) / L, rel=1e-12)
    x = m.sample(50, L, seed=0)
    np.testing.assert_allclose(m.log_prob(x), -order * math.log(V), rtol=1e-12)
    # Irreducible by construction: one long path visits every context.
    path = m.sample(1, V**order + order, seed=1)[0]
    ctxs = {tuple(path[i : i + order]) for i in range(V**order)}
    assert len(ctxs) == V**order
    # Any other continuation is impossible; with epsilon smoothing it is merely very unlikely.
    y = x.copy()
    y[:, -1] = (y[:, -1] + 1) % V
    assert np.all(m.log_prob(y) == -np.inf)
    assert m.nll_per_token(y) == math.inf
    smooth = MarkovSource(vocab_size=V, order=order, support=1, seed=3, epsilon=1e-6)
    assert np.all(np.isfinite(smooth.log_prob(y)))
    assert np.all(smooth.log_prob(y) < smooth.log_prob(x) - 10)


@pytest.mark.parametrize("support", [2, 3])
def test_tiny_first_order_chain_by_enumeration(support):
    m = MarkovSource(vocab_size=3, order=1, support=support, seed=11)
    P = dense_table(m)
    pi = eig_stationary(P)
    np.testing.assert_allclose(m.stationary, pi, atol=1e-12)
    # Hand formula for the entropy rate.
    rate = -sum(pi[i] * P[i, j] * math.log(P[i, j]) for i in range(3) for j in range(3) if P[i, j] > 0)
    assert m.entropy_rate.value == pytest.approx(rate, rel=1e-10, abs=1e-14)
    seqs = all_sequences(3, 4)
    probs = np.array([brute_markov_prob(m, s, P, pi) for s in seqs])
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(m.log_prob(seqs), np.log(probs), rtol=1e-10)
    pos = probs > 0
    entropy = -(probs[pos] * np.log(probs[pos])).sum()
    assert m.expected_nll_per_token(4).value == pytest.approx(entropy / 4, rel=1e-10)


def test_second_order_chain_prefixes_and_stationarity():
    m = MarkovSource(vocab_size=3, order=2, support=2, seed=5, concentration=0.7)
    P = dense_table(m)
    pi = eig_stationary(m.dense_transition())
    np.testing.assert_allclose(m.stationary, pi, atol=1e-12)
    for L in [1, 2, 3, 4]:  # L < order uses the marginal of pi
        seqs = all_sequences(3, L)
        probs = np.exp(m.log_prob(seqs))
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        pos = probs > 0
        entropy = -(probs[pos] * np.log(probs[pos])).sum()
        assert m.expected_nll_per_token(L).value == pytest.approx(entropy / L, rel=1e-10)
        if L >= 2:
            expected = np.array([brute_markov_prob(m, s, P, pi) for s in seqs])
            np.testing.assert_allclose(probs, expected, rtol=1e-10, atol=1e-300)
    # Stationary: every position of a length-4 sequence has the same marginal law.
    seqs = all_sequences(3, 4)
    probs = np.exp(m.log_prob(seqs))
    marginals = np.array([[probs[seqs[:, t] == v].sum() for v in range(3)] for t in range(4)])
    np.testing.assert_allclose(marginals, np.broadcast_to(marginals[0], (4, 3)), atol=1e-12)
    assert m.sample(4, 1, seed=0).shape == (4, 1)


def test_epsilon_entropy_rate_matches_dense_formula():
    m = MarkovSource(vocab_size=6, order=2, support=2, seed=2, epsilon=0.05)
    P = dense_table(m)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_allclose(m.next_token_probs(np.arange(m.n_contexts)), P, atol=1e-15)
    rate = -(m.stationary[:, None] * P * np.log(P)).sum()
    assert m.entropy_rate.value == pytest.approx(rate, rel=1e-12)
    np.testing.assert_allclose(m.stationary, eig_stationary(m.dense_transition()), atol=1e-12)


def test_power_iteration_agrees_with_exact_solve():
    m = MarkovSource(vocab_size=7, order=2, support=3, seed=8)
    pi, residual = m._power_stationary()
    assert residual < 1e-12
    np.testing.assert_allclose(pi, m._dense_stationary(), atol=1e-11)


def test_markov_samples_match_expected_nll():
    m = MarkovSource(vocab_size=16, order=2, support=3, seed=0)
    L = 32
    x = m.sample(4000, L, seed=123)
    assert x.shape == (4000, L) and x.dtype == np.int64
    per_seq = -m.log_prob(x) / L
    se = per_seq.std(ddof=1) / math.sqrt(len(per_seq))
    assert abs(per_seq.mean() - m.expected_nll_per_token(L).value) < 4 * se
    assert m.nll_per_token(x) == pytest.approx(per_seq.mean(), rel=1e-12)
    # Stationary: the first and the last position both follow the token marginal of pi (within 5 sigma).
    marginal = m.stationary.reshape(16, 16).sum(axis=1)
    sigma = np.sqrt(marginal * (1 - marginal) / len(x))
    for t in [0, L - 1]:
        freq = np.bincount(x[:, t], minlength=16) / len(x)
        assert np.all(np.abs(freq - marginal) < 5 * sigma + 1e-9)


def test_independent_positions_score_far_above_entropy_rate():
    """Factorization error: shuffling each position across samples keeps every marginal, loses the dependencies."""
    m = MarkovSource(vocab_size=12, order=1, support=12, seed=4, concentration=0.2)
    L = 24
    x = m.sample(2000, L, seed=7)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(x[:, t]) for t in range(L)], axis=1)
    real, independent = m.nll_per_token(x), m.nll_per_token(shuffled)
    assert real == pytest.approx(m.expected_nll_per_token(L).value, abs=0.05)
    assert independent > m.entropy_rate.value + 0.5
    assert independent > real + 0.5
    sparse = MarkovSource(vocab_size=12, order=1, support=2, seed=4)
    y = sparse.sample(500, L, seed=7)
    y_shuffled = np.stack([rng.permutation(y[:, t]) for t in range(L)], axis=1)
    assert oracle_nll(y_shuffled, sparse) == math.inf  # some transition is disallowed


def test_markov_is_deterministic_in_its_seed():
    a = MarkovSource(vocab_size=10, order=2, support=3, seed=1)
    b = MarkovSource(vocab_size=10, order=2, support=3, seed=1)
    c = MarkovSource(vocab_size=10, order=2, support=3, seed=2)
    np.testing.assert_array_equal(a.next_tokens, b.next_tokens)
    np.testing.assert_array_equal(a.sample(5, 9, seed=3), b.sample(5, 9, seed=3))
    assert not np.array_equal(a.next_tokens, c.next_tokens)
    assert not np.array_equal(a.sample(5, 9, seed=3), a.sample(5, 9, seed=4))


# --------------------------------------------------------------------------------------------------- HMM ----


def test_hmm_forward_matches_enumeration_over_hidden_paths():
    h = HMMSource(vocab_size=4, n_states=3, seed=6, emission_support=2)
    S, V, L = 3, 4, 4
    A, B, pi = h.transition, h.emission, h.stationary
    np.testing.assert_allclose(pi @ A, pi, atol=1e-14)
    seqs = all_sequences(V, L)
    brute = np.zeros(len(seqs))
    for i, x in enumerate(seqs):
        for path in itertools.product(range(S), repeat=L):
            p = pi[path[0]] * B[path[0], x[0]]
            for t in range(1, L):
                p *= A[path[t - 1], path[t]] * B[path[t], x[t]]
            brute[i] += p
    assert brute.sum() == pytest.approx(1.0, abs=1e-12)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(h.log_prob(seqs), np.log(brute), rtol=1e-10)
    assert np.isneginf(h.log_prob(seqs)).any()  # sparse emissions make some sequences impossible
    # The scaling keeps long sequences finite where the unscaled product would underflow.
    long = h.sample(3, 5000, seed=0)
    assert np.all(np.isfinite(h.log_prob(long)))


def test_hmm_samples_match_monte_carlo_estimates():
    h = HMMSource(vocab_size=16, n_states=4, seed=0, mc_samples=1000, mc_len=96, mc_burn_in=32)
    L = 32
    est = h.expected_nll_per_token(L)
    assert not est.exact and est.n_samples == 1000 and est.stderr > 0
    assert h.expected_nll_per_token(L) is est  # cached
    x = h.sample(1000, L, seed=99)
    per_seq = -h.log_prob(x) / L
    se = per_seq.std(ddof=1) / math.sqrt(len(per_seq))
    assert abs(per_seq.mean() - est.value) < 4 * math.hypot(se, est.stderr)
    # H(x_{0:L}) / L decreases towards the entropy rate from above.
    rate = h.entropy_rate
    assert rate.value < est.value + 4 * math.hypot(rate.stderr, est.stderr)
    shuffled = np.stack([np.random.default_rng(t).permutation(x[:, t]) for t in range(L)], axis=1)
    assert h.nll_per_token(shuffled) > est.value + 0.2


# ------------------------------------------------------------------------------------ interface, registry ----


@pytest.mark.parametrize("source", [MarkovSource(vocab_size=5, order=1, support=2), HMMSource(vocab_size=5)])
def test_invalid_tokens_raise(source):
    with pytest.raises(ValueError, match=r"invalid token id 7 at \(sample 1, position 2\)"):
        source.log_prob(np.array([[0, 1, 2], [1, 2, 7]]))
    with pytest.raises(ValueError, match="invalid token id -1"):
        source.nll_per_token(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="shape"):
        source.log_prob(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        source.log_prob(np.array([[0.0, 1.0]]))


def test_oracle_nll_accepts_torch_and_numpy():
    m = MarkovSource(vocab_size=9, order=1, support=3, seed=0)
    x = m.sample(20, 10, seed=0)
    assert oracle_nll(torch.from_numpy(x), m) == oracle_nll(x, m) == m.nll_per_token(x)


def test_registry_and_make_oracle():
    assert set(ORACLES.names()) >= {"hmm", "hmm_file", "markov", "markov_file"}
    m = make_oracle("markov", vocab_size=8, order=2, support=3, seed=4)
    assert isinstance(m, MarkovSource)
    rebuilt = make_oracle("markov", **m.config)
    np.testing.assert_array_equal(rebuilt.next_probs, m.next_probs)
    h = make_oracle("hmm", vocab_size=8, n_states=3, seed=1)
    np.testing.assert_array_equal(make_oracle("hmm", **h.config).emission, h.emission)
    with pytest.raises(UnknownNameError, match="did you mean 'markov'"):
        make_oracle("markv", vocab_size=8)
    with pytest.raises(TypeError, match="unknown config key.*'supprt'"):
        make_oracle("markov", vocab_size=8, supprt=2)
    with pytest.raises(TypeError, match="missing config key.*'vocab_size'"):
        make_oracle("hmm", n_states=2)
    with pytest.raises(ValueError, match="support must be <= vocab_size"):
        make_oracle("markov", vocab_size=4, support=5)
    with pytest.raises(ValueError, match="contexts exceeds the limit"):
        make_oracle("markov", vocab_size=1000, order=3)
