"""Dataset kind "tokens": pre-tokenized id files with a declared vocabulary, and sample files.

Accepted files (one per split):
  * .npy of shape (N, L): N sequences; L == seq_len, or L > seq_len and each is cut to its first seq_len ids;
  * .npy of shape (T,): one id stream, cut into T // seq_len blocks (no EOS is inserted, the tail is dropped);
  * .bin: a raw id stream (nanoGPT's train.bin) of the declared `DataConfig.dtype`, packed like a 1-D .npy.
Every id is checked against the declared vocab_size V; an id outside [0, V) is a DataError naming the file,
the id and its position (never an IndexError inside an embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsdfm.data.base import DATASET_KINDS, Corpus, DataConfig, DataError, require_file, to_long
from fsdfm.data.text import require_blocks
from fsdfm.data.tokenizer import TextTokenizer, load_tokenizer
from fsdfm.io import atomic_write

TOKEN_FILE_SUFFIXES = (".npy", ".bin")
_CHECK_CHUNK = 1 << 24  # ids per range check: bounded memory on memory-mapped paper-scale files


def read_token_file(path: str | Path, dtype: str | None = None, what: str = "token file") -> np.ndarray:
    """The ids of a .npy or .bin file, memory-mapped; `dtype` is required for .bin."""
    p = require_file(path, what)
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{what} {str(p)!r} is not a readable .npy file: {err}") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{what} {str(p)!r} holds {arr.dtype} values; token ids must be integers")
    elif p.suffix == ".bin":
        if dtype is None:
            raise DataError(f"{what} {str(p)!r} is raw binary: set DataConfig.dtype (e.g. 'uint16')")
        item = np.dtype(dtype).itemsize
        size = p.stat().st_size
        if size % item:
            raise DataError(f"{what} {str(p)!r} has {size} bytes, not a multiple of {item} ({dtype})")
        arr = np.memmap(p, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    else:
        raise DataError(f"{what} {str(p)!r} has suffix {p.suffix!r}; allowed: {', '.join(TOKEN_FILE_SUFFIXES)}")
    if arr.size == 0:
        raise DataError(f"{what} {str(p)!r} is empty")
    return arr


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError naming the first id outside [0, vocab_size) and its position (row, column) or index."""
    flat = ids.reshape(-1)
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start : start + _CHECK_CHUNK]
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            i = start + int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            pos = tuple(int(k) for k in np.unravel_index(i, ids.shape))
            at = f"index {pos[0]}" if len(pos) == 1 else f"row {pos[0]}, column {pos[1]}"
            raise DataError(f"{where}: id {int(flat[i])} at {at} is outside the declared vocabulary [0, {vocab_size})")


def token_file_blocks(path: str | Path, cfg: DataConfig, what: str) -> np.ndarray:
    """(N, seq_len) blocks of one token file (see the module docstring), ids checked against cfg.vocab_size."""
    ids = read_token_file(path, cfg.dtype, what)
    where = f"{what} {str(path)!r}"
    check_token_ids(ids, cfg.vocab_size, where)
    L = cfg.seq_len
    if ids.ndim == 2:
        if ids.shape[1] < L:
            raise DataError(f"{where} holds sequences of length {ids.shape[1]}, shorter than seq_len={L}")
        blocks = ids[:, :L]
    elif ids.ndim == 1:
        n = len(ids) // L
        blocks = ids[: n * L].reshape(n, L)
    else:
        raise DataError(f"{where} has shape {ids.shape}; expected (N, L) sequences or a 1-D id stream")
    return require_blocks(blocks, where, L, ids.size)


def _optional_tokenizer(cfg: DataConfig) -> TextTokenizer | None:
    if cfg.tokenizer in (None, "none"):
        return None
    if cfg.tokenizer == "bpe":
        raise DataError(
            "DataConfig.tokenizer='bpe' trains on text, which kind 'tokens' does not have; "
            "use 'gpt2', a tokenizer.json path, or 'none'"
        )
    return load_tokenizer(cfg.tokenizer)


@DATASET_KINDS.register("tokens")
def load_token_corpus(cfg: DataConfig, cache_dir: Path | None) -> Corpus:
    """Pre-tokenized train/valid files with the declared cfg.vocab_size (required); optional tokenizer for
    decoding. Nothing is cached: the files are memory-mapped and already ids."""
    if cfg.vocab_size is None:
        raise DataError("DataConfig.vocab_size is required for kind 'tokens' (the declared vocabulary of the ids)")
    train = token_file_blocks(cfg.train, cfg, "DataConfig.train")
    valid = token_file_blocks(cfg.valid, cfg, "DataConfig.valid")
    tok = _optional_tokenizer(cfg)
    return Corpus(
        train=to_long(train, cfg.max_train_blocks),
        valid=to_long(valid, cfg.max_valid_blocks),
        vocab_size=cfg.vocab_size,
        eos_id=tok.eos_id if tok else None,
        tokenizer=tok,
        name=cfg.name or Path(cfg.train).resolve().parent.name,
    )


def save_token_samples(path: str | Path, tokens: torch.Tensor | np.ndarray | Any) -> Path:
    """Save (B, L) integer ids (tensor or array) as an int64 .npy, atomically; `load_token_samples` reads it
    back and kind "tokens" accepts it as a split."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"token samples for {str(path)!r} must be a 2-D integer array (B, L), got {arr.dtype} of shape {arr.shape}"
        )
    p = Path(path)
    atomic_write(p, lambda f: np.save(f, arr.astype(np.int64), allow_pickle=False))
    return p


def load_token_samples(path: str | Path) -> np.ndarray:
    """(B, L) int64 ids saved by `save_token_samples`."""
    p = require_file(path, "token samples")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"token samples {str(p)!r} are not a readable .npy file: {err}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"token samples {str(p)!r} must be a 2-D integer array, got {arr.dtype} of shape {arr.shape}")
    return arr.astype(np.int64, copy=False)
