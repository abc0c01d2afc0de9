"""Exact oracle metrics: posterior_kl (model error) and the n-gram distance with its finite-sample floor."""

import itertools

import numpy as np
import torch

from fsdfm.data.oracle import HMMSource, MarkovSource, oracle_nll
from fsdfm.metrics.oracle import (
    corpus_metric_names,
    exact_ngram,
    extra_metrics,
    ngram_distance,
    ngram_floor,
    posterior_kl,
)
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import make_path
from fsdfm.schedulers import make_scheduler


def _setup(source="mask", V=6, L=8):
    src = MarkovSource(V, order=1, support=2, seed=1, epsilon=0.01)
    path = make_path(make_scheduler("polynomial", n=1.0), source, V)
    x_1 = torch.from_numpy(src.sample(32, L, seed=2))
    return src, path, x_1


def test_posterior_kl_is_zero_for_the_exact_model_and_positive_for_the_unigram_model():
    for source in ("mask", "uniform"):
        src, path, x_1 = _setup(source)
        exact = ExactPosterior(src, path)
        kl0 = posterior_kl(exact, exact, path, x_1, torch.Generator().manual_seed(0), t_grid=(0.1, 0.5, 0.9))
        assert abs(kl0) < 1e-12
        unigram = torch.log(torch.from_numpy(src.stationary))  # the stationary token marginal at every position

        def unigram_model(x_t, t):
            return unigram.expand(*x_t.shape, -1)

        kl = posterior_kl(unigram_model, exact, path, x_1, torch.Generator().manual_seed(0), t_grid=(0.1, 0.5, 0.9))
        assert kl > 0.05


def test_exact_ngram_tables_match_enumeration():
    """Markov (order 1 and 2) and HMM n-gram tables sum to 1 and equal the marginals of the first n tokens of a
    stationary sequence, computed by summing exp(log_prob) over every sequence of length n."""
    for src, n in [
        (MarkovSource(3, order=1, support=2, seed=0, epsilon=0.02), 2),
        (MarkovSource(3, order=2, support=2, seed=1), 3),
        (HMMSource(3, n_states=2, seed=2, emission_support=2), 2),
        (HMMSource(3, n_states=2, seed=2, emission_support=2), 3),
    ]:
        seqs = np.array(list(itertools.product(range(3), repeat=n)))
        with np.errstate(divide="ignore"):
            want = np.exp(src.log_prob(seqs))  # rows in base-3 order = the table's flattening
        got = exact_ngram(src, n)
        assert np.allclose(got, want, atol=1e-12) and abs(got.sum() - 1) < 1e-12


def test_ngram_distance_of_true_samples_shrinks_like_one_over_sqrt_n():
    src = MarkovSource(4, order=1, support=2, seed=3)
    means = []
    for n in (50, 800):  # 16x the windows: the TV should shrink about 4x
        means.append(np.mean([ngram_floor(src, n, 16, seed=s).tv for s in range(8)]))
    assert 2.8 < means[0] / means[1] < 5.6
    assert means[1] < 0.05


def test_most_likely_sequence_games_oracle_nll_but_not_the_ngram_distance():
    """A sampler that always emits the source's most likely sequence (Viterbi) has an oracle_nll below the
    entropy rate, but its n-gram distance is far above the finite-sample floor."""
    src = MarkovSource(8, order=1, support=3, seed=4, concentration=0.5)
    L, n = 32, 64
    P = np.zeros((8, 8))
    np.put_along_axis(P, src.next_tokens, src.next_probs, axis=1)
    with np.errstate(divide="ignore"):
        logP, score = np.log(P), np.log(src.stationary)
    back = []
    for _ in range(L - 1):  # Viterbi over the chain
        cand = score[:, None] + logP
        back.append(cand.argmax(0))
        score = cand.max(0)
    seq = [int(score.argmax())]
    for b in reversed(back):
        seq.append(int(b[seq[-1]]))
    best = np.tile(np.array(seq[::-1]), (n, 1))
    assert oracle_nll(best, src) < src.entropy_rate.value
    floor = ngram_floor(src, n, L, seed=0)
    dist = ngram_distance(best, src)
    assert dist.tv > 0.3 and dist.tv > 10 * floor.tv
    assert dist.kl > 10 * floor.kl


def test_extra_metrics_are_the_registered_oracle_metrics_of_an_oracle_corpus():
    """extra_metrics computes every registered metric that needs the oracle, each equal to the direct computation
    on a source rebuilt from the same config; other dataset kinds add nothing."""
    oracle = {
        "source": "markov",
        "vocab_size": 6,
        "order": 1,
        "support": 2,
        "epsilon": 0.01,
        "seed": 4,
        "n_train": 10,
        "n_valid": 10,
    }
    config = {"data": {"kind": "oracle", "seq_len": 8, "oracle": oracle}}
    src = MarkovSource(6, order=1, support=2, epsilon=0.01, seed=4)
    tokens = src.sample(12, 8, seed=9)
    out = extra_metrics(config, tokens, corpus=None)
    assert tuple(sorted(out.values)) == corpus_metric_names(config)
    dist, floor = ngram_distance(tokens, src), ngram_floor(src, 12, 8, seed=4 * 1000 + 3)
    assert out.values == {
        "oracle_nll": oracle_nll(tokens, src),
        "oracle_expected_nll": float(src.expected_nll_per_token(8)),
        "oracle_entropy_rate": float(src.entropy_rate),
        "ngram_tv": dist.tv,
        "ngram_kl": dist.kl,
        "ngram_tv_floor": floor.tv,
        "ngram_kl_floor": floor.kl,
    }
    np.testing.assert_allclose(out.per_sample["oracle_nll"], -src.log_prob(tokens) / 8)
    assert abs(out.per_sample["oracle_nll"].mean() - out.values["oracle_nll"]) < 1e-12  # their mean is oracle_nll
    assert extra_metrics({"data": {"kind": "text"}}, tokens, corpus=None).values == {}
