"""Cheap checks of a `DataConfig` at spec load time, before anything is written: `preflight(cfg, cache_dir)`.

The loaders check everything again when a stage builds its corpus, but by then plan.json and stage folders exist
and earlier stages may have trained for an hour. Here each dataset kind checks what it can without tokenizing a
large corpus and without writing anything (caches are read, never written):

  text    files (not a directory, not empty, UTF-8, with documents); the tokenizer (BPE vocab_size >= 257,
          a fixed tokenizer loadable and no larger than a declared vocab_size); every split long enough for one
          block of seq_len tokens (see `text_split_has_a_block`);
  tokens  vocab_size declared; files readable, of integer ids inside [0, vocab_size), long enough for a block;
          an optional tokenizer no larger than vocab_size;
  hf      local builder files present and non-empty; the tokenizer as for text;
  oracle  the source's keys (with close matches) and values, by building it; n_train / n_valid positive.

Every failure is a `PreflightError`, a DataError that carries the DataConfig key it is about.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

from fsdfm.data.base import DataConfig, DataError, require_file
from fsdfm.registry import Registry, did_you_mean
from fsdfm.data.tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    MIN_BPE_VOCAB_SIZE,
    TextTokenizer,
    _train_bpe_backend,
    bpe_cache_path,
    load_tokenizer,
)
from fsdfm.data.documents import read_documents
from fsdfm.data.tokenfiles import _optional_tokenizer, read_token_file, token_file_blocks
from fsdfm.data.hf import LOCAL_BUILDERS, PAPER_DATASETS
from fsdfm.data.oracle import SPLIT_KEYS, oracle_source
from fsdfm.data.oracle import ORACLES

READ_LIMIT = 64 << 20  # bytes of a text split read at load time; larger splits get the size checks only
ID_CHECK_LIMIT = 1 << 30  # bytes of a token file whose ids are all range-checked at load time
BPE_TRAIN_LIMIT = 4 << 20  # bytes of a train split on which an uncached BPE may be trained (in memory) to count


class PreflightError(DataError):
    """A DataConfig that cannot give a corpus; `key` is the DataConfig field it is about (train, seq_len, ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@contextlib.contextmanager
def about(key: str) -> Iterator[None]:
    """Attach `key` to any DataError raised inside (the loaders' messages name the file, not the spec key)."""
    try:
        yield
    except PreflightError:
        raise
    except DataError as e:
        raise PreflightError(key, str(e)) from None


PREFLIGHTS: Registry[Callable[[DataConfig, Path | None], None]] = Registry("data preflight")


def preflight(cfg: DataConfig, cache_dir: Path | None = None) -> None:
    """Run the checks of cfg.kind (kinds registered without checks pass); raises PreflightError."""
    if cfg.kind in PREFLIGHTS:
        PREFLIGHTS.get(cfg.kind)(cfg, cache_dir)


# ------------------------------------------------------------------------------------------------- text


def _nonempty_file(value: str | None, key: str) -> Path:
    with about(key):
        p = require_file(value, f"DataConfig.{key}")
    if p.stat().st_size == 0:
        raise PreflightError(key, f"file {str(p)!r} is empty")
    return p


def _fixed_or_cached_tokenizer(cfg: DataConfig, train: Path | None, cache_dir: Path | None, small: bool):
    """The tokenizer the loader will use, when it can be had without writing: a fixed one (gpt2, a file), a BPE
    already in `cache_dir`, or (small=True) a BPE trained in memory; None otherwise."""
    from tokenizers import Tokenizer

    spec = cfg.tokenizer or "bpe"
    if spec == "bpe":
        size = cfg.vocab_size or DEFAULT_BPE_VOCAB_SIZE
        if size < MIN_BPE_VOCAB_SIZE:
            raise PreflightError(
                "vocab_size", f"a byte-level BPE needs vocab_size >= {MIN_BPE_VOCAB_SIZE} (256 bytes + EOS), got {size}"
            )
        if train is None:
            return None
        with about("train"):
            path = bpe_cache_path(train, size, cache_dir)
            if path is not None and path.is_file():
                return TextTokenizer.from_backend(Tokenizer.from_file(str(path)), path.parent.name)
            if small and train.stat().st_size <= BPE_TRAIN_LIMIT:
                return TextTokenizer.from_backend(_train_bpe_backend(read_documents(train), size), "bpe")
        return None
    with about("tokenizer"):
        tok = load_tokenizer(spec, train, cfg.vocab_size, None)
    if cfg.vocab_size is not None and cfg.vocab_size < tok.vocab_size:
        raise PreflightError(
            "vocab_size",
            f"vocab_size={cfg.vocab_size} is smaller than tokenizer {tok.name!r}'s "
            f"{tok.vocab_size} tokens (tokenizer/vocabulary mismatch)",
        )
    return tok


def text_split_has_a_block(
    docs: list[str], seq_len: int, tokenize: Callable[[], object] | None, byte_level: bool = True
) -> bool | None:
    """Whether the documents pack into at least one block of seq_len tokens (each document + EOS).

    With a byte-level BPE (ours and GPT-2's) every token covers at least one byte and no token crosses a
    whitespace-separated word, so  words + n_docs <= n_tokens <= utf8 bytes + n_docs.  The bounds decide almost
    every case; in between (or for another tokenizer), `tokenize()` (a TextTokenizer or None) gives the exact
    count; None means undecided (the loader checks again at run time).
    """
    if byte_level:
        if sum(len(d.encode("utf-8")) for d in docs) + len(docs) < seq_len:
            return False
        if sum(len(d.split()) for d in docs) + len(docs) >= seq_len:
            return True
    tok = tokenize() if tokenize is not None else None
    if tok is None:
        return None
    return sum(len(ids) for ids in tok.encode_batch(docs)) + len(docs) >= seq_len


def _check_text_splits(cfg: DataConfig, paths: dict[str, Path], cache_dir: Path | None, byte_level: bool) -> None:

    train = paths.get("train")
    # vocabulary checks first (they need no documents); an uncached BPE is trained only if a count needs it
    state = {"tok": _fixed_or_cached_tokenizer(cfg, train, cache_dir, small=False)}
    state["final"] = state["tok"] is not None

    def tokenize():
        if not state["final"]:
            state["tok"], state["final"] = _fixed_or_cached_tokenizer(cfg, train, cache_dir, small=True), True
        return state["tok"]

    for key, path in paths.items():
        if path.stat().st_size > READ_LIMIT:
            continue
        with about(key):
            docs = read_documents(path)
        if not byte_level and path.stat().st_size > BPE_TRAIN_LIMIT:
            continue
        ok = text_split_has_a_block(docs, cfg.seq_len, tokenize, byte_level)
        if ok is False:
            raise PreflightError(
                "seq_len",
                f"seq_len={cfg.seq_len} is longer than the whole {key} split "
                f"{str(path)!r} ({len(docs)} documents, fewer tokens than one block)",
            )


@PREFLIGHTS.register("text")
def _text(cfg: DataConfig, cache_dir: Path | None) -> None:
    if (cfg.tokenizer or "bpe") == "none":
        raise PreflightError("tokenizer", "tokenizer 'none' is only allowed for kind 'tokens'")
    paths = {key: _nonempty_file(getattr(cfg, key), key) for key in ("train", "valid")}
    _check_text_splits(cfg, paths, cache_dir, byte_level=(cfg.tokenizer or "bpe") in ("bpe", "gpt2"))


# ----------------------------------------------------------------------------------------------- tokens


@PREFLIGHTS.register("tokens")
def _tokens(cfg: DataConfig, cache_dir: Path | None) -> None:

    if cfg.vocab_size is None:
        raise PreflightError("vocab_size", "vocab_size is required for kind 'tokens' (the declared vocabulary)")
    for key in ("train", "valid"):
        p = _nonempty_file(getattr(cfg, key), key)
        with about(key):
            if p.stat().st_size <= ID_CHECK_LIMIT:
                token_file_blocks(p, cfg, f"DataConfig.{key}")
            else:  # header and dtype only: the id scan of a paper-scale file runs in the loader
                read_token_file(p, cfg.dtype, f"DataConfig.{key}")
    with about("tokenizer"):
        tok = _optional_tokenizer(cfg)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise PreflightError(
            "vocab_size",
            f"vocab_size={cfg.vocab_size} is smaller than tokenizer {tok.name!r}'s {tok.vocab_size} tokens",
        )


# ------------------------------------------------------------------------------------------------- hf


@PREFLIGHTS.register("hf")
def _hf(cfg: DataConfig, cache_dir: Path | None) -> None:

    if cfg.hf_name is None:
        raise PreflightError(
            "hf_name",
            f"hf_name is required for kind 'hf': a hub dataset, one of "
            f"{', '.join(PAPER_DATASETS)}, or a local builder ({', '.join(LOCAL_BUILDERS)})",
        )
    spec = cfg.tokenizer or "gpt2"
    if spec == "none":
        raise PreflightError("tokenizer", "tokenizer 'none' is only allowed for kind 'tokens'")
    if spec == "bpe" and cfg.hf_name != "text":
        raise PreflightError(
            "tokenizer", f"tokenizer 'bpe' trains on a local text file (hf_name 'text'), not on {cfg.hf_name!r}"
        )
    if cfg.hf_name in LOCAL_BUILDERS:
        paths = {key: _nonempty_file(getattr(cfg, key), key) for key in ("train", "valid")}
        if cfg.hf_name == "text":
            _check_text_splits(cfg, paths, cache_dir, byte_level=spec in ("bpe", "gpt2"))
            return
    _fixed_or_cached_tokenizer(cfg, None, cache_dir, small=False)


# --------------------------------------------------------------------------------------------- oracle


@PREFLIGHTS.register("oracle")
def _oracle(cfg: DataConfig, cache_dir: Path | None) -> None:
    import inspect

    o = cfg.oracle or {}
    if not isinstance(o, dict):
        raise PreflightError("oracle", f"expected a mapping {{source: markov|hmm, ...}}, got {type(o).__name__}")
    source = o.get("source")
    if source not in ORACLES:
        raise PreflightError(
            "oracle.source",
            f"unknown oracle source {source!r}"
            f"{did_you_mean(str(source), ORACLES.names())}; allowed: "
            f"{', '.join(ORACLES.names())}",
        )
    allowed = ["source", *SPLIT_KEYS, *inspect.signature(ORACLES.get(source)).parameters]
    for key, value in o.items():
        if key not in allowed:
            raise PreflightError(
                f"oracle.{key}",
                f"unknown key for oracle source {source!r}"
                f"{did_you_mean(str(key), allowed)}; allowed: {', '.join(allowed)}",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise PreflightError(f"oracle.{key}", f"expected a finite number, got {value!r}")
    for key in SPLIT_KEYS:
        n = o.get(key, 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PreflightError(f"oracle.{key}", f"expected a positive integer, got {n!r}")
    seed = o.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**53:
        # the loader draws the splits with seeds seed * 1000 + 1 and + 2
        raise PreflightError("oracle.seed", f"expected an integer in [0, 2**53), got {seed!r}")
    with about("oracle"):
        oracle_source(cfg)
