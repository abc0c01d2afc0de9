"""The metric registry, compute_metrics dispatch and validation, data reference row and collapse flags."""

import math

import pytest
import torch

from fsdfm.metrics import (
    METRICS,
    SAMPLE_METRICS,
    MetricInfo,
    collapse_flags,
    compute_metrics,
    data_reference,
    distinct_n,
    entropy,
    gen_ppl,
    gen_ppl_seq_mean,
    rep_n,
    self_bleu,
)
from fsdfm.registry import UnknownNameError
from metrics_fixtures import WORDS, tinystories, word_evaluator

KNOWN_NAMES = [  # registered today; the registry may hold more (tests/test_registry.py checks discovery)
    "gen_ppl",
    "gen_ppl_seq_mean",
    "entropy_nats",
    "entropy_bits",
    "mauve",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "distinct_4",
    "self_bleu",
    "rep_n",
    "nfe",
    "cpu_s",
    "load_per_core",
    "wall_s",
    "tokens_per_s",
    "peak_mem",
    "val_nll",
    "elbo_ppl",
    "pos_divergence",
    "pos_divergence_slope",
    "oracle_nll",
    "oracle_expected_nll",
    "oracle_entropy_rate",
    "posterior_kl",
    "ngram_tv",
    "ngram_kl",
    "ngram_tv_floor",
    "ngram_kl_floor",
    "collapse_ngram",
    "ngram_tv_text",
    "gen_ppl_raw",
    "gen_ppl_first_scored",
    "gen_ppl_short_ctx",
    "train_copy",
    # recorded by the exact_law stage (fsdfm.metrics.law)
    "law_kl_qp",
    "law_kl_pq",
    "law_entropy_gap",
    "law_ce_excess",
    "split_path_kl",
    "split_factorization",
    "split_per_position",
]


def word_samples(n=6, length=10, seed=0):
    """Random word-level samples (ids in the word evaluator's vocabulary, no <unk>/<eos>) and their texts."""
    ids = torch.randint(2, len(WORDS), (n, length), generator=torch.Generator().manual_seed(seed))
    return ids, [" ".join(WORDS[i] for i in row) for row in ids.tolist()]


def test_registry_holds_every_metric_with_a_direction():
    assert set(KNOWN_NAMES) <= set(METRICS.names())
    assert METRICS.get("gen_ppl").direction == "min" and METRICS.get("mauve").direction == "max"
    assert METRICS.get("oracle_nll").direction == "min" and METRICS.get("entropy_nats").direction is None
    assert METRICS.get("tokens_per_s").direction == "max" and METRICS.get("self_bleu").direction == "min"
    assert METRICS.get("gen_ppl").best([3.0, 2.0, 5.0]) == 2.0 and METRICS.get("mauve").best([0.1, 0.9]) == 0.9
    assert METRICS.get("entropy_nats").best([1.0, 2.0]) is None
    with pytest.raises(ValueError, match="direction"):
        MetricInfo("x", "up", "u", "f", "d")
    with pytest.raises(UnknownNameError, match="did you mean 'gen_ppl'"):
        METRICS.get("gen_pppl")


def test_compute_metrics_matches_the_individual_functions():
    ids, texts = word_samples()
    ev = word_evaluator()
    names = [
        "gen_ppl",
        "gen_ppl_seq_mean",
        "entropy_nats",
        "entropy_bits",
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "distinct_4",
        "rep_n",
        "self_bleu",
    ]
    out = compute_metrics(ids, texts, names, evaluator=ev, self_bleu_subsample=4, seed=2)
    assert list(out) == names and all(isinstance(v, float) and not math.isnan(v) for v in out.values())
    assert out["gen_ppl"] == pytest.approx(gen_ppl(texts, ev).value)
    # same tokenizer here, no EOS: the two conventions see the same tokens; the sequence mean is >= (Jensen)
    assert out["gen_ppl_seq_mean"] == pytest.approx(gen_ppl_seq_mean(ids, ev).value)
    assert out["gen_ppl_seq_mean"] >= out["gen_ppl"] * (1 - 1e-9)
    assert out["entropy_nats"] == pytest.approx(entropy(ids).nats)
    assert out["entropy_bits"] == pytest.approx(out["entropy_nats"] / math.log(2))
    for n in range(1, 5):
        assert out[f"distinct_{n}"] == pytest.approx(distinct_n(ids, n))
    assert out["rep_n"] == pytest.approx(rep_n(ids, 4))
    assert out["self_bleu"] == pytest.approx(self_bleu(texts, n_subsample=4, seed=2).value)


def test_compute_metrics_mauve_with_references():
    stories = tinystories("valid", n=24, words=25)
    ev = word_evaluator()
    ids = torch.randint(0, 100, (12, 8))
    out = compute_metrics(
        ids, stories[:12], ["mauve"], references=stories[12:], mauve_featurizer="evaluator", evaluator=ev
    )
    assert 0.0 < out["mauve"] <= 1.0
    with pytest.raises(ValueError, match="as many references"):
        compute_metrics(
            ids, stories[:12], ["mauve"], references=stories[12:20], mauve_featurizer="evaluator", evaluator=ev
        )
    with pytest.raises(ValueError, match="needs references"):
        compute_metrics(ids, stories[:12], ["mauve"])


def test_compute_metrics_rejects_bad_input():
    ids, texts = word_samples()
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics(torch.zeros((0, 10), dtype=torch.long), [], ["entropy_nats"])
    with pytest.raises(ValueError, match="at least 2"):
        compute_metrics(torch.zeros((3, 1), dtype=torch.long), None, ["entropy_nats"])
    with pytest.raises(ValueError, match="5 texts for 6"):
        compute_metrics(ids, texts[:5], ["self_bleu"])
    with pytest.raises(ValueError, match="needs the decoded texts"):
        compute_metrics(ids, None, ["self_bleu"])
    with pytest.raises(ValueError, match="needs an evaluator"):
        compute_metrics(ids, texts, ["gen_ppl"])
    with pytest.raises(UnknownNameError, match="did you mean 'rep_n'"):
        compute_metrics(ids, texts, ["rep_m"])
    with pytest.raises(ValueError, match="sampling stage"):
        compute_metrics(ids, texts, ["nfe"])
    with pytest.raises(ValueError, match="repeated"):
        compute_metrics(ids, texts, ["rep_n", "rep_n"])
    with pytest.raises(ValueError, match="fewer than n=4"):
        compute_metrics(ids[:, :3], None, ["rep_n"])


def test_data_reference_is_compute_metrics_without_recorded_metrics():
    ids, texts = word_samples(seed=5)
    names = ["entropy_nats", "rep_n", "nfe", "wall_s", "distinct_2"]
    ref = data_reference(ids, texts, names)
    assert ref == compute_metrics(ids, texts, ["entropy_nats", "rep_n", "distinct_2"])
    assert set(SAMPLE_METRICS.names()) <= set(METRICS.names())


def test_collapse_flags_thresholds():
    data = {"entropy_nats": 4.0, "rep_n": 0.05}
    # thresholds: entropy below 4.0 - 0.3 = 3.7; rep_n above max(2 * 0.05, 0.05 + 0.1) = 0.15
    assert collapse_flags({"entropy_nats": 3.8, "rep_n": 0.14}, data) == {
        "collapse_entropy": False,
        "noise_entropy": False,
        "collapse_rep": False,
    }
    assert collapse_flags({"entropy_nats": 3.6, "rep_n": 0.16}, data) == {
        "collapse_entropy": True,
        "noise_entropy": False,
        "collapse_rep": True,
    }
    # more entropy than the data (4.0 + 0.3 = 4.3) is noise, not collapse (issue 24: mixture-Euler samples)
    assert collapse_flags({"entropy_nats": 4.4}, data) == {"collapse_entropy": False, "noise_entropy": True}
    # a large data rep_n: the 2x factor dominates the +0.1 margin
    assert collapse_flags({"rep_n": 0.55}, {"rep_n": 0.3}) == {"collapse_rep": False}
    assert collapse_flags({"rep_n": 0.65}, {"rep_n": 0.3}) == {"collapse_rep": True}
    assert collapse_flags({"gen_ppl": 10.0}, data) == {}
    # a real collapse: the same sentence over and over, against real text
    stories = tinystories("valid", n=8, words=40)
    vocab = {}
    real = torch.tensor([[vocab.setdefault(w, len(vocab)) for w in s.split()[:32]] for s in stories])
    looped = torch.tensor([[1, 2, 3, 4] * 8] * 8)
    flags = collapse_flags(
        compute_metrics(looped, None, ["entropy_nats", "rep_n"]), data_reference(real, None, ["entropy_nats", "rep_n"])
    )
    assert flags == {"collapse_entropy": True, "noise_entropy": False, "collapse_rep": True}
