"""Memorisation: the fraction of samples that reproduce a long n-gram of the training split.

train_copy (fraction), with n = min(16, L // 2) tokens (at least 1; the n of collapse_ngram):

    train_copy = (1 / N) sum_i 1[ grams_n(x_i) ∩ grams_n(s) != {} ]

where grams_n(x_i) are the n-token windows of sample i (inside its first L_i tokens when samples have lengths) and s
is the training split's token stream (its blocks in order: for a text corpus the packed document stream, so a window
across two blocks is contiguous training text). A sampler that copies training text (fsdfm.naive's copy_ngram) scores
1 while its gen-PPL, entropy, distinct-n and MAUVE all look like held-out data; held-out data scores the share of its
samples that repeat a training n-gram (boilerplate openings), which the data row of a study shows beside the methods.

Exact: windows are matched by a 64-bit polynomial hash and every hash hit is confirmed token by token, so a hash
collision can neither add nor hide a match.
"""

from __future__ import annotations

import numpy as np
import torch

from fsdfm.metrics.collapse import collapse_n
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome
from fsdfm.metrics.registry import register_metric

__all__ = ["copied_from_train", "train_copy_n", "window_hashes"]

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplication is a bijection mod 2^64


def train_copy_n(seq_len: int) -> int:
    """The n-gram length of train_copy for samples of seq_len tokens: min(16, L // 2), at least 1."""
    return collapse_n(seq_len)


def window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hashes (mod 2^64) of every window of n ids along the last axis: (..., T) -> (..., T - n + 1)."""
    ids = np.asarray(ids, dtype=np.int64)
    width = ids.shape[-1] - n + 1
    h = np.zeros((*ids.shape[:-1], max(width, 0)), dtype=np.uint64)
    if width <= 0:
        return h
    with np.errstate(over="ignore"):  # wrap-around mod 2^64 is the hash
        for j in range(n):
            h = h * _BASE + (ids[..., j : j + width] + 1).astype(np.uint64)
    return h


def copied_from_train(samples, train_stream, n: int, lengths=None) -> np.ndarray:
    """(N,) bool: whether sample i (N, L) holds, within its first lengths[i] tokens (default L), an n-gram that
    occurs in the 1-D training stream."""
    ids = np.ascontiguousarray(torch.as_tensor(samples).long().cpu().numpy())
    stream = np.ascontiguousarray(torch.as_tensor(train_stream).reshape(-1).long().cpu().numpy())
    N, L = ids.shape
    lens = np.full(N, L, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(N)
    out = np.zeros(N, dtype=bool)
    if stream.size < n or L < n:
        return out
    train_h = window_hashes(stream, n)
    order = np.argsort(train_h, kind="stable")
    sorted_h = train_h[order]
    sample_h = window_hashes(ids, n)  # (N, L - n + 1)
    lo = np.searchsorted(sorted_h, sample_h, side="left")
    hi = np.searchsorted(sorted_h, sample_h, side="right")
    valid = np.arange(L - n + 1)[None, :] <= (lens[:, None] - n)  # windows inside each sample's own tokens
    for i, j in zip(*np.nonzero((hi > lo) & valid)):
        if out[i]:
            continue
        window = ids[i, j : j + n]
        out[i] = any(np.array_equal(stream[p : p + n], window) for p in order[lo[i, j] : hi[i, j]])
    return out


@register_metric(
    "train_copy",
    sources=(
        "fsdfm.metrics.train_copy",
        "fsdfm.metrics.collapse:collapse_n",
        "fsdfm.metrics.inputs:MetricInputs",
    ),
    direction="min",
    unit="fraction",
    family="memorisation",
    target="data",
    needs=("train",),
    label="samples sharing a long n-gram with the training split (fraction)",
    show={"main": 16},
    description="memorisation: fraction of samples sharing an n-gram of min(16, L // 2) tokens with the training "
    "split (the data row: held-out text)",
)
def _train_copy(x: MetricInputs) -> MetricOutcome:
    n = train_copy_n(x.token_ids.shape[1])
    stream = x.need_train("train_copy")
    flags = copied_from_train(x.token_ids, stream, n, x.lengths)
    return MetricOutcome(
        float(flags.mean()),
        x.n,
        details={"n": n, "train_tokens": int(stream.numel())},
        per_sample={"train_copy": flags.astype(float)},
    )
