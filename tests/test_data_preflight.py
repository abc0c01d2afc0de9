"""Spec-time data checks (fsdfm.data.preflight): the corpus-length bounds and the exact count between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fsdfm.data import DataConfig, load_gpt2_tokenizer
from fsdfm.data.preflight import PreflightError, preflight, text_split_has_a_block

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "data" / "tinystories" / "train.txt")


class CountingTokenizer:
    """Encodes every document to `n` ids and counts the calls (a fake with a known answer)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def encode_batch(self, docs):
        self.calls += 1
        return [[0] * self.n for _ in docs]


def test_bounds_decide_without_tokenizing_and_the_exact_count_decides_between_them():
    docs = ["hello world"]  # 11 bytes, 2 words: 3 <= tokens + EOS <= 12
    tok = CountingTokenizer(4)
    assert text_split_has_a_block(docs, 13, lambda: tok) is False  # more than the byte bound
    assert text_split_has_a_block(docs, 3, lambda: tok) is True  # within the word bound
    assert tok.calls == 0
    assert text_split_has_a_block(docs, 5, lambda: tok) is True  # 4 ids + EOS = 5
    assert text_split_has_a_block(docs, 6, lambda: tok) is False
    assert tok.calls == 2
    assert text_split_has_a_block(docs, 6, lambda: None) is None  # undecided without a tokenizer


def test_gpt2_corpus_length_is_exact_at_the_boundary(tmp_path):
    text = "abcdefghij" * 10  # one word: the bounds (2 .. 101) leave it to the tokenizer
    (tmp_path / "v.txt").write_text(text + "\n")
    n = len(load_gpt2_tokenizer().encode(text)) + 1  # + EOS
    cfg = dict(kind="text", train=TRAIN, valid=str(tmp_path / "v.txt"), tokenizer="gpt2")
    preflight(DataConfig(**cfg, seq_len=n))
    with pytest.raises(PreflightError) as err:
        preflight(DataConfig(**cfg, seq_len=n + 1))
    assert err.value.key == "seq_len" and "v.txt" in str(err.value)


def test_token_file_ids_are_checked_with_their_position(tmp_path):
    ids = np.zeros((3, 8), dtype=np.int64)
    ids[2, 5] = 9
    np.save(tmp_path / "t.npy", ids)
    cfg = dict(kind="tokens", train=str(tmp_path / "t.npy"), valid=str(tmp_path / "t.npy"), seq_len=8)
    preflight(DataConfig(**cfg, vocab_size=10))
    with pytest.raises(PreflightError) as err:
        preflight(DataConfig(**cfg, vocab_size=9))
    assert err.value.key == "train" and "row 2, column 5" in str(err.value)


def test_a_cached_bpe_is_read_not_retrained(tmp_path, monkeypatch):
    import fsdfm.data.tokenizer as tokenizer
    from fsdfm.data.tokenizer import bpe_cache_path, train_bpe

    small = tmp_path / "train.txt"
    small.write_text("the cat sat on the mat\n\nthe dog sat on the log\n")
    tok = train_bpe(small, 300, tmp_path / "cache")
    assert bpe_cache_path(small, 300, tmp_path / "cache").is_file()
    (tmp_path / "v.txt").write_text("thecatsat\n")  # one word: counted with the tokenizer
    n = len(tok.encode("thecatsat")) + 1

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokenizer, "_train_bpe_backend", no_training)
    cfg = dict(kind="text", train=str(small), valid=str(tmp_path / "v.txt"), vocab_size=300)
    preflight(DataConfig(**cfg, seq_len=n), tmp_path / "cache")
    with pytest.raises(PreflightError):
        preflight(DataConfig(**cfg, seq_len=n + 1), tmp_path / "cache")
