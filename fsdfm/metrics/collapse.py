"""Comparisons a sampler cannot game with one number: cross-sample collapse, and an n-gram divergence to held-out text
with its finite-sample floor.

collapse_ngram (fraction): the fraction of samples that share at least one n-gram of n = min(16, L // 2) tokens with
another sample of the same batch,

    collapse = (1 / N) sum_i 1[ exists j != i : grams_n(x_i) ∩ grams_n(x_j) != {} ].

Per-sample entropy cannot see a batch of duplicated samples (each copy can have high entropy); a long shared n-gram
can. Held-out data has a small value (boilerplate openings); the data row of a study shows it beside the methods.

ngram_tv_text (TV): the total variation between the pooled word-bigram distributions of the samples and of held-out
reference texts, TV = (1/2) sum_g |q(g) - r(g)|. Finite samples leave a floor: the same distance between two
disjoint halves of the references of the samples' size (recorded as `floor` in the details), so a method is as close
to the data as the data is to itself when TV ~ floor.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from fsdfm.metrics.registry import register_metric
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome

COLLAPSE_MAX_N = 16
TEXT_NGRAM = 2


def collapse_n(seq_len: int) -> int:
    """The n-gram length of collapse_ngram for sequences of seq_len tokens: min(16, L // 2), at least 1."""
    return max(1, min(COLLAPSE_MAX_N, seq_len // 2))


def shares_ngram(token_ids: torch.Tensor, n: int) -> np.ndarray:
    """(N,) bool: whether sample i shares an n-gram with another sample (N, L) of the batch."""
    ids = np.ascontiguousarray(torch.as_tensor(token_ids).long().cpu().numpy())
    N, L = ids.shape
    if N < 2 or L < n:
        return np.zeros(N, dtype=bool)
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (N, L - n + 1, n)
    flat = np.ascontiguousarray(windows.reshape(-1, n))
    _, gram = np.unique(flat.view(np.dtype((np.void, flat.dtype.itemsize * n))), return_inverse=True)
    gram = gram.reshape(N, -1)
    owner = np.repeat(np.arange(N), gram.shape[1])
    pairs = np.unique(np.stack([gram.ravel(), owner]), axis=1)  # (gram, sample) once per sample
    n_owners = np.bincount(pairs[0], minlength=int(gram.max()) + 1)
    return (n_owners[gram] >= 2).any(axis=1)


@register_metric(
    "collapse_ngram",
    sources=("fsdfm.metrics.collapse:shares_ngram", "fsdfm.metrics.collapse:_collapse_ngram"),
    direction="min",
    unit="fraction",
    family="diversity",
    target="data",
    label="samples sharing a long n-gram (fraction)",
    show={"main": 14, "sweep": 7},
    description="cross-sample collapse: fraction of samples sharing an n-gram of min(16, L // 2) tokens with another "
    "sample of the batch (the data row: held-out text)",
)
def _collapse_ngram(x: MetricInputs) -> MetricOutcome:
    n = collapse_n(x.token_ids.shape[1])
    flags = shares_ngram(x.token_ids, n)
    return MetricOutcome(float(flags.mean()), x.n, details={"n": n}, per_sample={"collapse_ngram": flags.astype(float)})


def word_ngrams(texts: list[str], n: int = TEXT_NGRAM) -> Counter:
    """Pooled counts of word n-grams (whitespace words) over texts."""
    out: Counter = Counter()
    for t in texts:
        w = t.split()
        out.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return out


def ngram_tv(a: Counter, b: Counter) -> float:
    """TV between the normalised n-gram counts a and b (1.0 when either is empty)."""
    na, nb = sum(a.values()), sum(b.values())
    if na == 0 or nb == 0:
        return 1.0
    return 0.5 * sum(abs(a.get(g, 0) / na - b.get(g, 0) / nb) for g in set(a) | set(b))


@register_metric(
    "ngram_tv_text",
    sources=(
        "fsdfm.metrics.collapse:word_ngrams",
        "fsdfm.metrics.collapse:ngram_tv",
        "fsdfm.metrics.collapse:_ngram_tv_text",
    ),
    direction="min",
    unit="TV",
    family="diversity",
    needs=("texts", "references"),
    label="word-bigram TV to held-out text",
    show={"main": 15},
    description="TV between the word-bigram distributions of the samples and held-out text; details.floor: the same "
    "TV between two disjoint held-out halves of the samples' size (the finite-sample floor)",
)
def _ngram_tv_text(x: MetricInputs) -> MetricOutcome:
    texts, refs = x.clean_texts("ngram_tv_text"), x.clean_references
    if not refs or len(refs) < 2:
        raise ValueError("metric 'ngram_tv_text' needs at least 2 held-out reference texts")
    m = min(len(texts), len(refs) // 2)  # the floor's halves: as large as the samples where the references allow
    half_a, half_b = refs[:m], refs[m : 2 * m]
    value = ngram_tv(word_ngrams(texts), word_ngrams(half_b))
    floor = ngram_tv(word_ngrams(half_a), word_ngrams(half_b))
    return MetricOutcome(value, len(texts), details={"floor": floor, "floor_n_texts": m, "n": TEXT_NGRAM})
