"""Cross-sample collapse and the n-gram divergence to held-out text, against hand-computed answers."""

import torch

from fsdfm.metrics import compute_metrics
from fsdfm.metrics.collapse import collapse_n, ngram_tv, shares_ngram, word_ngrams


def test_collapse_flags_exactly_the_samples_sharing_a_long_ngram():
    x = torch.arange(5 * 8).view(5, 8)  # all n-grams distinct
    assert not shares_ngram(x, 4).any()
    x[3, 2:6] = x[1, 4:8]  # samples 1 and 3 share a 4-gram, nobody else does
    assert shares_ngram(x, 4).tolist() == [False, True, False, True, False]
    assert not shares_ngram(x, 5).any()  # and no 5-gram
    x[0, :4] = x[0, 4:]  # a repeat inside one sample is not cross-sample collapse
    assert shares_ngram(x, 4).tolist() == [False, True, False, True, False]
    assert collapse_n(64) == 16 and collapse_n(8) == 4


def test_a_batch_of_copies_collapses_completely():
    x = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(0)).expand(6, 32)
    assert compute_metrics(x, None, ["collapse_ngram"])["collapse_ngram"] == 1.0


def test_text_ngram_tv_known_answers():
    a = word_ngrams(["a b c", "a b"])  # (a,b) x2, (b,c) x1
    b = word_ngrams(["a b", "c d"])  # (a,b), (c,d)
    assert ngram_tv(a, a) == 0.0
    assert abs(ngram_tv(a, b) - 0.5 * (abs(2 / 3 - 1 / 2) + 1 / 3 + 1 / 2)) < 1e-12
    refs = ["the cat sat", "the dog ran", "the cat sat", "the dog ran"]
    out = compute_metrics(torch.zeros(2, 3, dtype=torch.long), ["the cat sat", "the dog ran"], ["ngram_tv_text"],
                          references=refs)  # fmt: skip
    assert out["ngram_tv_text"] == 0.0
