"""Documents from text files, and packing of tokenized documents into fixed-length blocks.

Packing (GPT-2 / nanoGPT style): the documents' ids are concatenated with EOS after each document,

    stream = d_1 + [eos] + d_2 + [eos] + ... + d_n + [eos],

and the stream is cut into consecutive blocks of L = seq_len ids. The last len(stream) mod L ids (the tail
remainder, < L) are dropped, so a block never contains padding and every position is a real token.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fsdfm.data.base import DataError, require_file

EOS_TOKEN = "<|endoftext|>"


def clean_documents(texts: Iterable[str | None]) -> list[str]:
    """Strip surrounding whitespace and drop empty documents."""
    return [t.strip() for t in texts if t is not None and t.strip()]


def split_documents(text: str) -> list[str]:
    """Split a corpus text into documents.

    If some line is exactly `<|endoftext|>` (TinyStories), documents are the text between such lines and may
    contain blank lines. Otherwise (WikiText) each blank-line-separated paragraph is one document.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    is_separator = [line.strip() == EOS_TOKEN for line in lines]
    if not any(is_separator):
        is_separator = [line.strip() == "" for line in lines]
    docs, current = [], []
    for line, sep in zip(lines, is_separator):
        if sep:
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return clean_documents(docs)


def read_documents(path: str | Path) -> list[str]:
    """The documents of a UTF-8 text file (see `split_documents`); a missing or empty file is a DataError."""
    p = require_file(path, "text corpus")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"text corpus {str(p)!r} is not valid UTF-8 ({err})") from None
    if not text.strip():
        raise DataError(f"text corpus {str(p)!r} is empty")
    docs = split_documents(text)
    if not docs:
        raise DataError(f"text corpus {str(p)!r} holds no documents (only {EOS_TOKEN} separators)")
    return docs


class BlockPacker:
    """Streaming version of `pack_blocks`: `add` batches of documents, then take `blocks()`.

    Ids are held in `dtype` (2 bytes per id for vocabularies up to 65,536), so a paper-scale split of
    ~9e9 GPT-2 tokens needs ~18 GB while packing.
    """

    def __init__(self, seq_len: int, eos_id: int | None, dtype: np.dtype | type = np.int64):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.eos_id, self.dtype = seq_len, eos_id, np.dtype(dtype)
        self._chunks: list[np.ndarray] = []

    def add(self, docs_ids: Sequence[Sequence[int]]) -> None:
        tail = [] if self.eos_id is None else [self.eos_id]
        count = sum(len(d) for d in docs_ids) + len(tail) * len(docs_ids)
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(d, tail) for d in docs_ids), dtype=self.dtype, count=count
        )
        self._chunks.append(flat)

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self._chunks)

    def blocks(self) -> np.ndarray:
        """(n_tokens // seq_len, seq_len) array; the tail remainder is dropped."""
        stream = np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)
        n = len(stream) // self.seq_len
        return stream[: n * self.seq_len].reshape(n, self.seq_len)


def pack_blocks(docs_ids: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> np.ndarray:
    """Concatenate documents with EOS after each (none when eos_id is None) and cut into (N, seq_len) int64
    blocks, N = len(stream) // seq_len; the tail remainder is dropped."""
    packer = BlockPacker(seq_len, eos_id, np.int64)
    packer.add(docs_ids)
    return packer.blocks()
