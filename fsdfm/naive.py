"""Naive samplers: model-free sanity rows that show which metric each kind of degenerate output fools.

No network is trained. The training split (the very blocks the other methods of a study train on) is counted once
(`count_tokens`), and each rule draws N samples of L tokens from the counts or from the split itself:

    unigram     x_{i,j} ~ q i.i.d.,  q(v) = c(v) / sum_w c(w)           c: the token counts of the training split
    repeat_top  x_{i,j} = v*,  v* = argmax_{v != EOS} c(v)             (lowest id on a tie; EOS excluded, since a
                                                                        sample of EOS only decodes to empty text)
    copy_ngram  x_i = s[a_i : a_i + L],  a_i ~ U{0, ..., T - L}        s: the training split's token stream (its
                                                                        blocks in order, T tokens), a_i independent

What each one fools, and what exposes it:
    unigram     per-sample entropy and distinct-n look like data; gen-PPL (no word order) and MAUVE expose it.
    repeat_top  an evaluator LM that has seen the token repeated a few times predicts it well, so gen-PPL can look
                good; entropy (0), distinct-n, rep_n and collapse_ngram (every pair of samples shares its n-grams)
                expose it.
    copy_ngram  real training text: gen-PPL, entropy, distinct-n and MAUVE all look like data; only a memorisation
                metric (`train_copy`: samples sharing a long n-gram with the training split) exposes it.

The stream s of a text corpus is the packed document stream itself (fsdfm.data packs documents, EOS between them,
and cuts consecutive blocks), so a copied span is contiguous training text; for an oracle corpus it is the
training sequences one after the other.

Boundary: the library floor; knows the update-rule type of fsdfm.samplers (`SampleOutput`) and nothing of studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fsdfm.samplers import SampleOutput

__all__ = [
    "NAIVE_RULES",
    "NaiveRule",
    "TokenCounts",
    "count_tokens",
    "draw_copy_ngram",
    "draw_repeat_top",
    "draw_unigram",
    "training_stream",
]


@dataclass(frozen=True)
class TokenCounts:
    """The token counts of a training split: `counts` (V,) int64, c(v) = occurrences of id v; `eos_id` the corpus's
    end-of-document id (None without one)."""

    counts: np.ndarray
    eos_id: int | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def probs(self) -> np.ndarray:
        """q(v) = c(v) / sum_w c(w): (V,) float64."""
        return self.counts.astype(np.float64) / float(self.counts.sum())

    @property
    def top_token(self) -> int:
        """argmax_{v != EOS} c(v), the lowest id on a tie."""
        c = self.counts.astype(np.int64).copy()
        if self.eos_id is not None and len(c) > 1:
            c[self.eos_id] = -1
        return int(np.argmax(c))


def count_tokens(train: torch.Tensor, vocab_size: int, eos_id: int | None = None) -> TokenCounts:
    """c(v) over every token of the training split `train` (N, L) ids in [0, V): a `TokenCounts` of length V."""
    counts = torch.bincount(torch.as_tensor(train).reshape(-1).long().cpu(), minlength=vocab_size)
    if counts.numel() != vocab_size:
        raise ValueError(f"count_tokens: ids reach {counts.numel() - 1}, outside the vocabulary of {vocab_size}")
    return TokenCounts(counts.numpy().astype(np.int64), eos_id)


def training_stream(train: torch.Tensor) -> torch.Tensor:
    """The training split's blocks (N, L) in order as one stream (N * L,)."""
    return torch.as_tensor(train).reshape(-1).long()


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def draw_unigram(
    counts: TokenCounts, stream: torch.Tensor, n: int, seq_len: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, seq_len) ids, each drawn i.i.d. from q (float64 categorical draws on the generator's device)."""
    probs = torch.as_tensor(counts.probs, dtype=torch.float64, device=_device(generator))
    draws = torch.multinomial(probs, n * seq_len, replacement=True, generator=generator)
    return draws.view(n, seq_len).cpu()


def draw_repeat_top(
    counts: TokenCounts, stream: torch.Tensor, n: int, seq_len: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, seq_len) ids, every one the most frequent non-EOS training token v* (deterministic: no draw)."""
    return torch.full((n, seq_len), counts.top_token, dtype=torch.long)


def draw_copy_ngram(
    counts: TokenCounts, stream: torch.Tensor, n: int, seq_len: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, seq_len) ids: row i is the span stream[a_i : a_i + seq_len], a_i uniform on {0, ..., T - seq_len}."""
    total = int(stream.numel())
    if total < seq_len:
        raise ValueError(f"copy_ngram: the training stream has {total} tokens, fewer than one sample of {seq_len}")
    starts = torch.randint(0, total - seq_len + 1, (n,), generator=generator, device=_device(generator)).cpu()
    return stream.cpu()[starts[:, None] + torch.arange(seq_len)[None, :]]


class NaiveRule:
    """A naive sampler registered as an update rule (for the naive kind only): `draw(counts, stream, n, seq_len,
    generator) -> (n, seq_len)` ids. It has no jump probability and runs no loop over a model: calling it as
    either (fsdfm.samplers) is an error that says so."""

    def __init__(self, name: str, draw: Callable, doc: str):
        self.name, self.draw, self.__doc__ = name, draw, doc

    def __call__(self, p_z, t, h, scheduler):
        raise TypeError(f"{self.name!r} is a naive sampler (fsdfm.naive): it draws without a model, not a jump rule")

    def sample_loop(self, model, path, **kw) -> SampleOutput:
        raise TypeError(f"{self.name!r} is a naive sampler (fsdfm.naive): it draws without a model, not from one")

    def sample(self, counts: TokenCounts, stream: torch.Tensor, n: int, seq_len: int, generator) -> SampleOutput:
        """The draw as a `SampleOutput`: nfe 0 (no network is evaluated), a one-point time grid."""
        tokens = self.draw(counts, stream, n, seq_len, generator)
        return SampleOutput(tokens=tokens, nfe=0, time_grid=torch.zeros(1, dtype=torch.float64))


NAIVE_RULES = (
    NaiveRule("unigram", draw_unigram, "Naive: i.i.d. tokens from the training unigram (fools entropy, distinct-n)"),
    NaiveRule("repeat_top", draw_repeat_top, "Naive: the top training token repeated L times (fools gen-PPL)"),
    NaiveRule("copy_ngram", draw_copy_ngram, "Naive: a span copied from the training split (fools all but train_copy)"),
)
