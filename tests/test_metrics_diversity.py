"""Entropy, distinct-n, rep-n and self-BLEU on hand-computed cases and against naive references."""

import math
import random

import pytest
import sacrebleu
import torch

from fsdfm.metrics.diversity import distinct_n, entropy, rep_n, self_bleu
from metrics_fixtures import tinystories

ABABAB = torch.tensor([[0, 1, 0, 1, 0, 1]])  # 'a b a b a b'


def test_entropy_known_values():
    result = entropy(torch.tensor([[1, 1, 2, 2]]))
    assert result.nats == pytest.approx(math.log(2))
    assert result.bits == pytest.approx(1.0)
    # per-sample entropies 0 and ln 4, averaged over samples (not the pooled entropy of both rows)
    result = entropy(torch.tensor([[7, 7, 7, 7], [1, 2, 3, 4]]))
    assert result.nats == pytest.approx(math.log(4) / 2) and result.n_samples == 2


def test_entropy_matches_counter_reference():
    ids = torch.randint(0, 50, (13, 40), generator=torch.Generator().manual_seed(0))
    expected = []
    for row in ids.tolist():
        counts = {v: row.count(v) for v in set(row)}
        expected.append(-sum(c / len(row) * math.log(c / len(row)) for c in counts.values()))
    assert entropy(ids).nats == pytest.approx(sum(expected) / len(expected))


def test_distinct_and_rep_by_hand():
    # unigrams a b a b a b: 2 unique / 6; bigrams ab ba ab ba ab: 2 / 5; trigrams aba bab aba bab: 2 / 4
    assert distinct_n(ABABAB, 1) == pytest.approx(2 / 6)
    assert distinct_n(ABABAB, 2) == pytest.approx(2 / 5)
    assert distinct_n(ABABAB, 3) == pytest.approx(2 / 4)
    assert rep_n(ABABAB, 2) == pytest.approx(1 - 2 / 5)
    assert rep_n(ABABAB, 4) == pytest.approx(1 - 2 / 3)  # abab baba abab
    # distinct pools over samples, rep is within samples
    twice = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert distinct_n(twice, 1) == pytest.approx(3 / 6)
    assert rep_n(twice, 1) == 0.0


def test_distinct_and_rep_match_set_reference():
    ids = torch.randint(0, 4, (9, 30), generator=torch.Generator().manual_seed(1))
    rows = ids.tolist()
    for n in (1, 2, 3, 4):
        grams = [tuple(r[i : i + n]) for r in rows for i in range(len(r) - n + 1)]
        assert distinct_n(ids, n) == pytest.approx(len(set(grams)) / len(grams))
        per = [1 - len({tuple(r[i : i + n]) for i in range(len(r) - n + 1)}) / (len(r) - n + 1) for r in rows]
        assert rep_n(ids, n) == pytest.approx(sum(per) / len(per))


def test_diversity_input_errors():
    with pytest.raises(ValueError, match="no samples"):
        entropy(torch.zeros((0, 5), dtype=torch.long))
    with pytest.raises(ValueError, match="fewer than n=4"):
        rep_n(torch.zeros((2, 3), dtype=torch.long), 4)
    with pytest.raises(ValueError, match="shape"):
        distinct_n(torch.zeros(5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="integer"):
        entropy(torch.zeros((2, 3)))


def test_self_bleu_identical_and_disjoint():
    same = ["the little cat sat on the warm mat all day long"] * 5
    assert self_bleu(same).value == pytest.approx(100.0)
    disjoint = [
        "alpha beta gamma delta epsilon",
        "one two three four five",
        "red green blue cyan magenta",
        "north south east west up",
    ]
    assert self_bleu(disjoint).value == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n_subsample, seed", [(None, 0), (7, 3)])
def test_self_bleu_matches_naive_sacrebleu(n_subsample, seed):
    texts = tinystories("valid", n=25, words=40)
    result = self_bleu(texts, n_subsample=n_subsample, seed=seed)
    hyps = range(len(texts))
    if n_subsample is not None:
        hyps = sorted(random.Random(seed).sample(range(len(texts)), n_subsample))
    naive = [sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i + 1 :]).score for i in hyps]
    assert result.value == pytest.approx(sum(naive) / len(naive), rel=1e-9)
    assert result.n_hypotheses == len(naive) and result.n_samples == 25
    assert 0.0 < result.value < 100.0


def test_self_bleu_errors():
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_self_bleu_ties_and_duplicates_match_naive_sacrebleu():
    # duplicated texts and equal n-gram counts in several texts exercise the top-2 clip-count shortcut
    rng = random.Random(0)
    words = ["a", "b", "c", "d"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(12)]
    texts += [texts[0], texts[3], "a a a a", "a a a a", "b"]
    naive = [sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i + 1 :]).score for i in range(len(texts))]
    assert self_bleu(texts).value == pytest.approx(sum(naive) / len(naive), rel=1e-9)


def test_per_sample_entropy_and_rep_n_average_to_the_reported_values():
    import math

    from fsdfm.metrics.diversity import rep_n_per_sample

    ids = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6], [1, 2, 1, 2, 1, 2]])
    ent = entropy(ids)
    assert ent.per_sample.tolist() == pytest.approx([0.0, math.log(6), math.log(2)])
    assert ent.nats == pytest.approx(ent.per_sample.mean())
    # 4-grams per row: 3; unique: 1, 3, 2 -> repeated fractions 2/3, 0, 1/3
    assert rep_n_per_sample(ids, 4).tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert rep_n(ids, 4) == pytest.approx(1 / 3)
