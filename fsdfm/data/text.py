"""Dataset kind "text": local UTF-8 files (one per split), tokenized and packed into cached blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fsdfm.data.base import (
    CACHE_RECIPE,
    DATASET_KINDS,
    Corpus,
    DataConfig,
    DataError,
    cached_blocks,
    compact_dtype,
    digest,
    require_file,
    to_long,
)
from fsdfm.data.documents import BlockPacker, read_documents
from fsdfm.data.tokenizer import TextTokenizer, load_tokenizer
from fsdfm.io import sha256_file


def resolve_tokenizer(
    cfg: DataConfig, default: str, cache_dir: Path | None, train_path: Path | None = None
) -> TextTokenizer:
    """The tokenizer named by cfg.tokenizer (None = `default`) for a text-based kind."""
    spec = cfg.tokenizer or default
    if spec == "none":
        raise DataError(f"DataConfig.tokenizer='none' is only allowed for kind 'tokens', not {cfg.kind!r}")
    return load_tokenizer(spec, train_path, cfg.vocab_size, cache_dir)


def corpus_vocab_size(cfg: DataConfig, tok: TextTokenizer, trained: bool) -> int:
    """The corpus vocabulary V of a tokenizer-built corpus.

    For a trained tokenizer ("bpe"), V is its actual size (vocab_size was only its target). For a fixed
    tokenizer, V is the declared vocab_size when given (it may pad the vocabulary, e.g. GPT-2 to 50304, never
    shrink it), else the tokenizer's size.
    """
    if trained or cfg.vocab_size is None:
        return tok.vocab_size
    if cfg.vocab_size < tok.vocab_size:
        raise DataError(
            f"DataConfig.vocab_size={cfg.vocab_size} is smaller than tokenizer {tok.name!r}'s "
            f"{tok.vocab_size} tokens (tokenizer/vocabulary mismatch)"
        )
    return cfg.vocab_size


def require_blocks(blocks: np.ndarray, where: str, seq_len: int, n_tokens: int | None = None) -> np.ndarray:
    if blocks.shape[0] == 0:
        have = f" (it has {n_tokens} tokens)" if n_tokens is not None else ""
        raise DataError(f"{where} gives no block of seq_len={seq_len} tokens{have}")
    return blocks


def text_file_blocks(path: Path, tok: TextTokenizer, seq_len: int, cache_dir: Path | None) -> np.ndarray:
    """(N, seq_len) blocks of a text file: documents -> ids -> EOS-separated stream -> blocks (cached)."""

    def compute() -> np.ndarray:
        packer = BlockPacker(seq_len, tok.eos_id, compact_dtype(tok.vocab_size))
        packer.add(tok.encode_batch(read_documents(path)))
        return require_blocks(packer.blocks(), f"text corpus {str(path)!r}", seq_len, packer.n_tokens)

    key = digest(
        {
            "recipe": CACHE_RECIPE,
            "kind": "text",
            "file": sha256_file(path),
            "tokenizer": tok.fingerprint,
            "seq_len": seq_len,
        }
    )
    return cached_blocks(cache_dir, f"text-{key[:24]}", compute)


@DATASET_KINDS.register("text")
def load_text_corpus(cfg: DataConfig, cache_dir: Path | None) -> Corpus:
    """Train/valid text files (documents split as in `read_documents`); tokenizer default "bpe"."""
    train = require_file(cfg.train, "DataConfig.train")
    valid = require_file(cfg.valid, "DataConfig.valid")
    tok = resolve_tokenizer(cfg, "bpe", cache_dir, train)
    vocab_size = corpus_vocab_size(cfg, tok, trained=(cfg.tokenizer or "bpe") == "bpe")
    blocks = {
        split: text_file_blocks(path, tok, cfg.seq_len, cache_dir)
        for split, path in (("train", train), ("valid", valid))
    }
    return Corpus(
        train=to_long(blocks["train"], cfg.max_train_blocks),
        valid=to_long(blocks["valid"], cfg.max_valid_blocks),
        vocab_size=vocab_size,
        eos_id=tok.eos_id,
        tokenizer=tok,
        name=cfg.name or train.resolve().parent.name,
    )
