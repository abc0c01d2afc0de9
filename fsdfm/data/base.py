"""The data contract: `DataConfig` in, `Corpus` out, one loader per dataset kind.

A *corpus* is two LongTensors of packed token blocks, `train` (N, L) and `valid` (M, L), plus the data
vocabulary size V (ids lie in [0, V); the mask token of a mask source is added by the model, not here),
the EOS id and, when the ids are text, the tokenizer that decodes them.

Kinds are looked up by name in `DATASET_KINDS` (a `Registry`); each maps `(cfg, cache_dir) -> Corpus`.
`load_corpus` dispatches, applies `max_train_blocks` / `max_valid_blocks` and checks the result
(non-empty splits, ids inside the vocabulary, seq_len within the model's limit) so that a bad corpus is a
`DataError` before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from fsdfm.io import atomic_write
from fsdfm.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from fsdfm.data.tokenizer import TextTokenizer

# Bump when the packing / tokenizing recipe changes, so that stale caches are never reused.
CACHE_RECIPE = "fsdfm-data-v1"
SPLITS = ("train", "valid")


class DataError(ValueError):
    """Bad data input: a missing/empty file, a bad config value, ids outside the vocabulary, ..."""


DATASET_KINDS: Registry[Callable[["DataConfig", Path | None], "Corpus"]] = Registry("dataset kind")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DataConfig:
    """Where the text or token ids come from and how they are cut into blocks.

    kind: "text" (local text files), "tokens" (pre-tokenized .npy/.bin), "hf" (Hugging Face `datasets`),
        or any other name registered in `DATASET_KINDS`.
    train, valid: file paths ("text", "tokens", and "hf" with a local builder such as hf_name="text"),
        or split specs such as "validation" or "train[-100000:]" ("hf" with a hub dataset; None = the
        default splits of a `PAPER_DATASETS` entry).
    tokenizer: "bpe" (byte-level BPE trained on `train`), "gpt2", a tokenizer.json path or a directory
        holding one, "none", or None = the kind's default ("bpe" for text, "gpt2" for hf, none for tokens).
    vocab_size: the BPE target size for tokenizer "bpe" (None = 2048); for "tokens" the declared vocabulary
        (required); otherwise an optional declared vocabulary >= the tokenizer's (e.g. GPT-2 padded to 50304).
    seq_len: L, the block length.
    max_train_blocks, max_valid_blocks: keep the first N blocks (None = all).
    text_field: column holding the text ("hf").
    hf_name, hf_config: dataset path/name and config ("hf"); a key of `PAPER_DATASETS` fills in the rest.
    dtype: numpy dtype of raw binary token files (".bin"), e.g. "uint16".
    name: display name of the corpus (None = derived from the files / dataset).
    """

    kind: str = "text"
    train: str | None = None
    valid: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    seq_len: int = 128
    max_train_blocks: int | None = None
    max_valid_blocks: int | None = None
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    dtype: str | None = None
    name: str | None = None
    oracle: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `DataError` naming the field and value of the first bad setting."""
        try:
            DATASET_KINDS.get(self.kind)
        except UnknownNameError as err:
            raise DataError(f"DataConfig.kind: {err}") from None
        if not _is_int(self.seq_len) or self.seq_len < 1:
            raise DataError(f"DataConfig.seq_len must be a positive integer, got {self.seq_len!r}")
        for key in ("vocab_size", "max_train_blocks", "max_valid_blocks"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise DataError(f"DataConfig.{key} must be a positive integer or None, got {value!r}")
        for key in ("train", "valid", "tokenizer", "hf_name", "hf_config", "dtype", "name"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or str(value) == ""):
                raise DataError(f"DataConfig.{key} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"DataConfig.text_field must be a non-empty string, got {self.text_field!r}")
        if (self.kind == "oracle") != (self.oracle is not None):
            raise DataError(
                "DataConfig.oracle: the oracle settings ({source: markov|hmm, ...}) go with kind 'oracle' "
                f"and only with it (kind is {self.kind!r})"
            )
        if self.dtype is not None:
            try:
                dt = np.dtype(self.dtype)
            except TypeError:
                dt = None
            if dt is None or not np.issubdtype(dt, np.integer):
                raise DataError(f"DataConfig.dtype must name a numpy integer dtype (e.g. 'uint16'), got {self.dtype!r}")


@dataclass(frozen=True, eq=False)
class Corpus:
    """Packed token blocks ready for training and evaluation.

    train: LongTensor (N, L); valid: LongTensor (M, L); every id in [0, vocab_size).
    vocab_size: V, the data vocabulary (no mask token).
    eos_id: the id placed after every document, or None (token files without a tokenizer).
    tokenizer: decodes ids to text, or None.
    """

    train: torch.Tensor
    valid: torch.Tensor
    vocab_size: int
    eos_id: int | None = None
    tokenizer: TextTokenizer | None = field(default=None, repr=False)
    name: str = "corpus"

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def split(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        return self.train if split == "train" else self.valid

    def texts(self, split: str = "valid", n: int | None = None, skip_special_tokens: bool = False) -> list[str]:
        """Decode the first n blocks of a split (all when n is None); n larger than the split is an error."""
        if self.tokenizer is None:
            raise DataError(f"corpus {self.name!r} has no tokenizer, so its blocks cannot be decoded to text")
        blocks = self.split(split)
        if n is None:
            n = len(blocks)
        if not _is_int(n) or n < 0 or n > len(blocks):
            raise DataError(f"texts({split!r}, n={n!r}): the {split} split of {self.name!r} has {len(blocks)} blocks")
        return self.tokenizer.decode_batch(blocks[:n], skip_special_tokens=skip_special_tokens)


def load_corpus(cfg: DataConfig, cache_dir: str | Path | None = None, max_seq_len: int | None = None) -> Corpus:
    """Build the corpus of `cfg` through its kind's loader, then check it.

    max_seq_len: the model's longest sequence; a larger cfg.seq_len is a DataError (before tokenizing).
    cache_dir: where tokenizers and packed blocks are cached (None = no disk cache).
    """
    if max_seq_len is not None and cfg.seq_len > max_seq_len:
        raise DataError(f"DataConfig.seq_len={cfg.seq_len} exceeds the model's max_seq_len={max_seq_len}")
    loader = DATASET_KINDS.get(cfg.kind)
    corpus = loader(cfg, Path(cache_dir) if cache_dir is not None else None)
    corpus = Corpus(
        train=corpus.train[: cfg.max_train_blocks],
        valid=corpus.valid[: cfg.max_valid_blocks],
        vocab_size=corpus.vocab_size,
        eos_id=corpus.eos_id,
        tokenizer=corpus.tokenizer,
        name=cfg.name or corpus.name,
    )
    check_corpus(corpus, cfg.seq_len)
    return corpus


def check_corpus(corpus: Corpus, seq_len: int) -> None:
    """Shapes (N, seq_len) int64, non-empty splits, ids in [0, V), EOS and tokenizer inside V."""
    V = corpus.vocab_size
    if not _is_int(V) or V < 1:
        raise DataError(f"corpus {corpus.name!r}: vocab_size must be a positive integer, got {V!r}")
    for split in SPLITS:
        x = corpus.split(split)
        where = f"corpus {corpus.name!r}, {split} split"
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.ndim != 2:
            raise DataError(
                f"{where}: expected a LongTensor (N, L), got {getattr(x, 'dtype', type(x))} "
                f"of shape {tuple(getattr(x, 'shape', ()))}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{where} is empty: no block of seq_len={seq_len} tokens")
        if x.shape[1] != seq_len:
            raise DataError(f"{where}: blocks have length {x.shape[1]}, expected seq_len={seq_len}")
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= V:
            bad = int(torch.nonzero((x < 0) | (x >= V))[0, 0])
            raise DataError(
                f"{where}: ids must lie in [0, {V}) but block {bad} holds {lo if lo < 0 else hi} "
                f"(tokenizer/vocabulary mismatch?)"
            )
    if corpus.eos_id is not None and not 0 <= corpus.eos_id < V:
        raise DataError(f"corpus {corpus.name!r}: eos_id={corpus.eos_id} lies outside the vocabulary [0, {V})")
    if corpus.tokenizer is not None and corpus.tokenizer.vocab_size > V:
        tok = corpus.tokenizer
        raise DataError(
            f"corpus {corpus.name!r}: tokenizer {tok.name!r} has {tok.vocab_size} tokens "
            f"but the declared vocab_size is {V}"
        )


# --- caching helpers -------------------------------------------------------------------------------------


def digest(obj: object) -> str:
    """sha256 of a JSON-serialisable object (sorted keys): the cache key of a recipe."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def require_file(path: str | Path | None, what: str) -> Path:
    """`path` as a Path, or a DataError naming `what` when it is unset, missing or not a file."""
    if path is None:
        raise DataError(f"{what} is not set")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what}: file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"{what}: {str(p)!r} is not a file")
    return p


def cached_blocks(cache_dir: Path | None, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Blocks from `cache_dir/blocks/<key>.npy`, or `compute()` them and save them there."""
    if cache_dir is None:
        return compute()
    path = cache_dir / "blocks" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a damaged cache entry is recomputed, not trusted
            pass
    blocks = compute()
    atomic_write(path, lambda f: np.save(f, blocks, allow_pickle=False))
    return blocks


def compact_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids in [0, vocab_size): caches and packing use 2 or 4 bytes per id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def to_long(blocks: np.ndarray, max_blocks: int | None = None) -> torch.Tensor:
    """First `max_blocks` rows of a (N, L) id array as a LongTensor (slice before widening to int64)."""
    return torch.from_numpy(np.array(blocks[:max_blocks], dtype=np.int64))  # a copy: never alias a memmap
