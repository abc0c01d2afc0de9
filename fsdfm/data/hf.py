"""Dataset kind "hf": Hugging Face `datasets` (paper scale), tokenized with GPT-2 and packed into cached blocks.

One code path for the cluster and for offline tests: `datasets.load_dataset(path, config, split=...)` for a hub
dataset, or `load_dataset("text" | "json" | ..., data_files=...)` for local files. Each row's text field is one
document, except for the "text" builder, whose files are read whole and split like `read_documents`
(`<|endoftext|>` lines, else blank-line paragraphs) so that hf_name="text" gives exactly the blocks of kind
"text". Documents are tokenized in batches (tokenizers uses every core), EOS follows each document, and the
stream is cut into seq_len blocks (1,024 at paper scale) cached in cache_dir/blocks/.

Raw downloads and Arrow files live in $HF_DATASETS_CACHE when it is set, else in cache_dir/hf_datasets.
Offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1), a dataset that is not cached is a DataError saying how to
pre-download it. No detokenization is applied (WikiText-103 keeps its " @-@ " spacing). The block cache key of a
hub dataset is its name, config and split (not its revision): delete cache_dir/blocks to re-tokenize a newer copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

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
from fsdfm.data.documents import BlockPacker, clean_documents, split_documents
from fsdfm.data.text import corpus_vocab_size, require_blocks, resolve_tokenizer
from fsdfm.data.tokenizer import TextTokenizer
from fsdfm.io import sha256_file


@dataclass(frozen=True)
class HFSource:
    """Where a paper dataset lives on the hub, and which splits serve as train and valid."""

    path: str
    config: str | None
    text_field: str
    train_split: str
    valid_split: str


# OpenWebText and FineWeb-Edu have only a train split: the last 100k documents are held out (MDLM convention).
PAPER_DATASETS: dict[str, HFSource] = {
    "openwebtext": HFSource("Skylion007/openwebtext", None, "text", "train[:-100000]", "train[-100000:]"),
    "fineweb-edu": HFSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "text", "train[:-100000]", "train[-100000:]"),
    "wikitext-103": HFSource("Salesforce/wikitext", "wikitext-103-raw-v1", "text", "train", "validation"),
    "lm1b": HFSource("dvruette/lm1b", None, "text", "train", "test"),
}
# Packaged builders that read local files: DataConfig.train / valid are then file paths.
LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow")
_BATCH = 1024  # documents per tokenizer call


def hf_datasets_cache(cache_dir: Path | None) -> str | None:
    """$HF_DATASETS_CACHE when set (clusters point it at scratch), else cache_dir/hf_datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    return str(cache_dir / "hf_datasets") if cache_dir is not None else None


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False))


def load_hf_split(path: str, config: str | None, split: str, cache: str | None) -> Any:
    """`datasets.load_dataset` of one split; a local builder's `split` is its data file. Errors -> DataError."""
    import datasets

    if path in LOCAL_BUILDERS:
        kwargs: dict[str, Any] = dict(data_files={"train": split}, split="train")
        if path == "text":
            kwargs["sample_by"] = "document"  # whole files, split into documents by split_documents
    else:
        kwargs = dict(name=config, split=split)
    try:
        return datasets.load_dataset(path, cache_dir=cache, **kwargs)
    except (ConnectionError, FileNotFoundError) as err:
        if not _offline():
            raise DataError(
                f"Hugging Face dataset {path!r} (config {config!r}, split {split!r}) could not be loaded: {err}"
            ) from err
        config_arg = f", {config!r}" if config else ""
        raise DataError(
            f"Hugging Face dataset {path!r} (config {config!r}, split {split!r}) is not available offline: "
            f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the cache {cache or '~/.cache/huggingface'}. "
            f"Pre-download it on a machine with network access:\n"
            f'  python -c "import datasets; datasets.load_dataset({path!r}{config_arg}, cache_dir={cache!r})"\n'
            f"then copy that cache here (or set HF_DATASETS_CACHE to it) and run again."
        ) from err
    except Exception as err:  # e.g. an unknown split or config: keep the library's message
        raise DataError(
            f"Hugging Face dataset {path!r} (config {config!r}, split {split!r}) could not be "
            f"loaded: {type(err).__name__}: {err}"
        ) from err


def hf_documents(ds: Any, text_field: str, split_text: bool) -> Iterator[list[str]]:
    """Batches of cleaned documents from the `text_field` column of a `datasets.Dataset`."""
    if text_field not in ds.column_names:
        raise DataError(
            f"DataConfig.text_field={text_field!r} is not a column of the dataset; "
            f"columns: {', '.join(ds.column_names)}"
        )
    for batch in ds.select_columns([text_field]).iter(batch_size=_BATCH):
        texts = batch[text_field]
        yield [d for t in texts if t for d in split_documents(t)] if split_text else clean_documents(texts)


def hf_blocks(cfg: DataConfig, path: str, split: str, tok: TextTokenizer, cache_dir: Path | None) -> np.ndarray:
    """(N, seq_len) blocks of one split (cached under a key of the source, tokenizer and seq_len)."""
    local = path in LOCAL_BUILDERS
    where = f"Hugging Face dataset {path!r} (config {cfg.hf_config!r}, split {split!r})"
    source = {"file": sha256_file(split)} if local else {"config": cfg.hf_config, "split": split}
    key = digest(
        {
            "recipe": CACHE_RECIPE,
            "kind": "hf",
            "path": path,
            **source,
            "text_field": cfg.text_field,
            "tokenizer": tok.fingerprint,
            "seq_len": cfg.seq_len,
        }
    )

    def compute() -> np.ndarray:
        ds = load_hf_split(path, cfg.hf_config, split, hf_datasets_cache(cache_dir))
        packer = BlockPacker(cfg.seq_len, tok.eos_id, compact_dtype(tok.vocab_size))
        with tqdm(total=len(ds), desc=f"tokenize {path}:{split}", unit="row", disable=len(ds) < 100_000) as bar:
            for docs in hf_documents(ds, cfg.text_field, split_text=path == "text"):
                packer.add(tok.encode_batch(docs))
                bar.update(_BATCH)
        return require_blocks(packer.blocks(), where, cfg.seq_len, packer.n_tokens)

    return cached_blocks(cache_dir, f"hf-{key[:24]}", compute)


@DATASET_KINDS.register("hf")
def load_hf_corpus(cfg: DataConfig, cache_dir: Path | None) -> Corpus:
    """cfg.hf_name: a `PAPER_DATASETS` key, a hub dataset, or a local builder ("text", "json", ...);
    tokenizer default "gpt2"."""
    if cfg.hf_name is None:
        raise DataError(
            f"DataConfig.hf_name is required for kind 'hf': a hub dataset, one of "
            f"{', '.join(PAPER_DATASETS)}, or a local builder ({', '.join(LOCAL_BUILDERS)})"
        )
    paper = PAPER_DATASETS.get(cfg.hf_name)
    if paper is not None:  # the table fills in what the config leaves unset
        cfg = replace(
            cfg,
            hf_name=paper.path,
            hf_config=cfg.hf_config or paper.config,
            train=cfg.train or paper.train_split,
            valid=cfg.valid or paper.valid_split,
            text_field=paper.text_field if cfg.text_field == "text" else cfg.text_field,
            name=cfg.name or cfg.hf_name,
        )
    path = cfg.hf_name
    splits = {}
    for split in ("train", "valid"):
        value = getattr(cfg, split)
        if value is None:
            raise DataError(
                f"DataConfig.{split} is required for Hugging Face dataset {path!r} "
                f"(a split such as 'train' or 'validation', or a data file for a local builder)"
            )
        splits[split] = str(require_file(value, f"DataConfig.{split}")) if path in LOCAL_BUILDERS else value
    spec = cfg.tokenizer or "gpt2"
    if spec == "bpe" and path != "text":
        raise DataError(
            f"DataConfig.tokenizer='bpe' trains on a local text file (hf_name='text'), not on {path!r}; "
            f"use 'gpt2' or a tokenizer.json path"
        )
    tok = resolve_tokenizer(cfg, "gpt2", cache_dir, Path(splits["train"]) if path == "text" else None)
    blocks = {split: hf_blocks(cfg, path, s, tok, cache_dir) for split, s in splits.items()}
    name = cfg.name or (Path(splits["train"]).resolve().parent.name if path in LOCAL_BUILDERS else path)
    return Corpus(
        train=to_long(blocks["train"], cfg.max_train_blocks),
        valid=to_long(blocks["valid"], cfg.max_valid_blocks),
        vocab_size=corpus_vocab_size(cfg, tok, trained=spec == "bpe"),
        eos_id=tok.eos_id,
        tokenizer=tok,
        name=name,
    )
