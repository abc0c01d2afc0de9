"""Diversity / degeneration metrics on token ids and on texts.

All id-based metrics take a (N, L) integer tensor of the model's own token ids (N samples of L tokens) and
optional per-sample `lengths` (N,): sample i is its first L_i = lengths[i] ids, the rest of its row is padding
that no metric sees (samples scored from outside, `fsdfm eval`, are shorter than L; a model's samples fill L, and
lengths=None or all L gives the very same numbers):

* `entropy`:     H_i = -sum_v p_iv ln p_iv with p_iv = count of v in sample i / L_i; reported as mean_i H_i
                 in nats and in bits. Low entropy = repetitive samples (a classic collapse that perplexity hides).
* `distinct_n`:  |unique n-grams over all samples| / |n-grams over all samples| (n-grams never cross samples).
* `rep_n`:       mean_i (1 - |unique n-grams of sample i| / |n-grams of sample i|): within-sample repetition,
                 over the samples with at least n ids (a shorter one has no n-gram; its per-sample value is NaN).
* `self_bleu`:   mean over (a seeded subsample of) samples of sacrebleu sentence BLEU-4 of the sample against
                 all the other samples as references. High = the samples resemble each other.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class EntropyResult:
    """Per-sample unigram entropy averaged over `n_samples`: `nats` and `bits` (= nats / ln 2); `per_sample`:
    (N,) float64 H_i in nats."""

    nats: float
    bits: float
    n_samples: int
    per_sample: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SelfBleuResult:
    """Mean sentence BLEU-4 (0..100) of `n_hypotheses` samples, each against the other `n_samples - 1`."""

    value: float
    n_hypotheses: int
    n_samples: int
    seed: int


def as_token_matrix(token_ids, what: str = "token_ids", min_len: int = 1) -> torch.Tensor:
    """Validate and convert (N, L) ids (tensor, array or nested lists) to a CPU LongTensor."""
    try:
        ids = torch.as_tensor(token_ids)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected an (N, L) integer array of equal-length samples ({err})") from None
    if ids.dim() != 2:
        raise ValueError(f"{what}: expected shape (N, L), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer token ids, got dtype {ids.dtype}")
    if ids.shape[0] == 0:
        raise ValueError(f"{what}: no samples (shape {tuple(ids.shape)})")
    if ids.shape[1] < min_len:
        raise ValueError(f"{what}: samples have {ids.shape[1]} tokens, need at least {min_len}")
    if int(ids.min()) < 0:
        raise ValueError(f"{what}: negative token id {int(ids.min())}")
    return ids.long().cpu()


def as_lengths(lengths, ids: torch.Tensor, what: str = "lengths") -> torch.Tensor | None:
    """Validate per-sample lengths (N,) of an (N, L) id matrix: ints in [1, L]. Returns None when every sample
    fills its row (the full-row code path, so a model's samples score bit-identically with or without them)."""
    if lengths is None:
        return None
    lens = torch.as_tensor(np.asarray(lengths))
    n, length = ids.shape
    if lens.shape != (n,) or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"{what}: expected ({n},) integer lengths, got {lens.dtype} {tuple(lens.shape)}")
    lens = lens.long()
    if n and (int(lens.min()) < 1 or int(lens.max()) > length):
        raise ValueError(f"{what}: lengths must lie in [1, {length}], got [{int(lens.min())}, {int(lens.max())}]")
    return None if bool((lens == length).all()) else lens


def valid_mask(lens: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) lengths -> (N, width) bool: position j of sample i is content (j < L_i)."""
    return torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)


def entropy(token_ids, lengths=None) -> EntropyResult:
    """Unigram entropy of each sample's token ids, averaged over samples (see module docstring).

    token_ids: (N, L) ids; lengths: optional (N,) content lengths L_i (the ids after L_i are not counted)."""
    ids = as_token_matrix(token_ids)
    n, length = ids.shape
    lens = as_lengths(lengths, ids, "entropy: lengths")
    # Count (sample, token) pairs with one unique over a combined key instead of an (N, V) histogram:
    # V can be 50k and N thousands.
    span = int(ids.max()) + 1
    keys = torch.arange(n).unsqueeze(1) * span + ids
    if lens is not None:
        keys = keys[valid_mask(lens, length)]
    uniq, counts = torch.unique(keys, return_counts=True)
    p = counts.double() / (length if lens is None else lens[uniq // span].double())
    per_sample = torch.zeros(n, dtype=torch.float64).index_add_(0, uniq // span, -p * p.log())
    nats = float(per_sample.mean())
    return EntropyResult(nats=nats, bits=nats / math.log(2), n_samples=n, per_sample=per_sample.numpy())


def _ngrams(ids: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """(N, L) -> (N, L-n+1, n) sliding n-grams; raises if the samples are shorter than n."""
    if n < 1:
        raise ValueError(f"{what}: n must be >= 1, got {n}")
    if ids.shape[1] < n:
        raise ValueError(f"{what}: samples have {ids.shape[1]} tokens, fewer than n={n}")
    return ids.unfold(1, n, 1)


def _gram_mask(lens: torch.Tensor | None, n_samples: int, n_grams: int, n: int) -> torch.Tensor | None:
    """(N, L-n+1) bool: n-gram j of sample i lies inside its content (j + n <= L_i); None for full rows."""
    return None if lens is None else valid_mask(lens - n + 1, n_grams)


def distinct_n(token_ids, n: int, lengths=None) -> float:
    """Unique n-grams / total n-grams, pooled over all samples (only n-grams inside each sample's length)."""
    ids = as_token_matrix(token_ids, "distinct_n")
    lens = as_lengths(lengths, ids, "distinct_n: lengths")
    grams = _ngrams(ids, n, "distinct_n")
    mask = _gram_mask(lens, grams.shape[0], grams.shape[1], n)
    grams = grams.reshape(-1, n) if mask is None else grams[mask]
    if grams.shape[0] == 0:
        raise ValueError(f"distinct_n: no sample has {n} ids, so there is no {n}-gram")
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]


def rep_n(token_ids, n: int = 4, lengths=None) -> float:
    """Mean over samples (with at least n ids) of the within-sample fraction of repeated n-grams, 1 - unique/total."""
    return rep_n_mean(rep_n_per_sample(token_ids, n, lengths), n)


def rep_n_mean(per_sample: np.ndarray, n: int) -> float:
    """The mean of `rep_n_per_sample` over the samples that have an n-gram (NaN: none)."""
    if np.isnan(per_sample).all():
        raise ValueError(f"rep_n: no sample has {n} ids, so there is no {n}-gram")
    return float(np.nanmean(per_sample))


def rep_n_per_sample(token_ids, n: int = 4, lengths=None) -> np.ndarray:
    """(N,) float64: each sample's fraction of repeated n-grams, 1 - unique/total (their mean is `rep_n`); NaN for
    a sample shorter than n (lengths (N,) given: it has no n-gram)."""
    ids = as_token_matrix(token_ids, "rep_n")
    lens = as_lengths(lengths, ids, "rep_n: lengths")
    grams = _ngrams(ids, n, "rep_n")
    n_samples, per_sample = grams.shape[0], grams.shape[1]
    # Prefix each n-gram with its sample index so one unique() counts unique n-grams per sample.
    rows = torch.arange(n_samples).repeat_interleave(per_sample).unsqueeze(1)
    keyed = torch.cat([rows, grams.reshape(-1, n)], dim=1)
    mask = _gram_mask(lens, n_samples, per_sample, n)
    if mask is not None:
        keyed = keyed[mask.reshape(-1)]
    uniq = torch.unique(keyed, dim=0)
    unique_per_sample = torch.bincount(uniq[:, 0], minlength=n_samples).double()
    if mask is None:
        return (1.0 - unique_per_sample / per_sample).numpy()
    total = mask.sum(dim=1).double()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total.numpy() > 0, 1.0 - unique_per_sample.numpy() / total.numpy(), np.nan)


def self_bleu(texts: Sequence[str], n_subsample: int | None = None, seed: int = 0) -> SelfBleuResult:
    """Mean sacrebleu sentence BLEU-4 of each hypothesis against all other texts as references.

    Hypotheses: all texts, or `n_subsample` of them drawn without replacement with `random.Random(seed)`.
    References for hypothesis i: every text except i (the full set, not only the subsample).

    Identical to `sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i+1:]).score` (13a tokenizer, exp
    smoothing, effective order; checked in the tests), but computed in O(total n-grams): the multi-reference
    clip count max_{j != i} c_j(g) is the largest count of g over all texts unless text i holds it, in which
    case it is the second largest. The naive form costs O(N^2) n-gram extractions.
    """
    from sacrebleu.metrics import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"self_bleu: needs at least 2 texts, got {len(texts)}")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("self_bleu: texts must be strings")
    bleu = BLEU(effective_order=True)  # the settings of sacrebleu.sentence_bleu
    order = bleu.max_ngram_order
    counts: list[Counter] = []
    lengths: list[int] = []
    for text in texts:
        grams, length = extract_all_word_ngrams(bleu._preprocess_segment(text), 1, order)
        counts.append(grams)
        lengths.append(length)
    # top-2 counts per n-gram over all texts: gram -> [best count, its text index, second best count]
    top: dict[tuple, list[int]] = {}
    for j, grams in enumerate(counts):
        for gram, c in grams.items():
            entry = top.get(gram)
            if entry is None:
                top[gram] = [c, j, 0]
            elif c > entry[0]:
                top[gram] = [c, j, entry[0]]
            elif c > entry[2]:
                entry[2] = c
    hyps = list(range(len(texts)))
    if n_subsample is not None and n_subsample < len(texts):
        if n_subsample < 1:
            raise ValueError(f"self_bleu: n_subsample must be >= 1, got {n_subsample}")
        hyps = sorted(random.Random(seed).sample(hyps, n_subsample))
    scores = []
    for i in hyps:
        correct, total = [0] * order, [0] * order
        for gram, c in counts[i].items():
            best, holder, second = top[gram]
            clip = second if holder == i else best
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, clip)
        ref_len = bleu._get_closest_ref_len(lengths[i], lengths[:i] + lengths[i + 1 :])
        scores.append(bleu._compute_score_from_stats([lengths[i], ref_len] + correct + total).score)
    return SelfBleuResult(value=sum(scores) / len(scores), n_hypotheses=len(hyps), n_samples=len(texts), seed=seed)
