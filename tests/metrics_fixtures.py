"""Tiny, locally built evaluator LMs and tokenizers for the metrics tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from fsdfm.metrics.evaluator import Evaluator

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<eos>", "the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "small", "red", "blue", "and"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over WORDS; '<eos>' is the EOS special token (id 1)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """The bundled GPT-2 BPE tokenizer (data/gpt2_tokenizer/tokenizer.json)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ROOT / "data" / "gpt2_tokenizer" / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    return tok


def tiny_gpt2(vocab_size: int, eos_id: int, seed: int = 0, n_positions: int = 64) -> GPT2LMHeadModel:
    """Randomly initialised 2-layer GPT-2; a large init range so per-token NLLs differ clearly."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        initializer_range=0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def word_evaluator(seed: int = 0) -> Evaluator:
    tokenizer = word_tokenizer()
    model = tiny_gpt2(len(WORDS), tokenizer.eos_token_id, seed)
    return Evaluator(model=model, tokenizer=tokenizer, name="tiny-word-gpt2")


def gpt2_evaluator(seed: int = 0) -> Evaluator:
    tokenizer = gpt2_tokenizer()
    model = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, seed, n_positions=128)
    return Evaluator(model=model, tokenizer=tokenizer, name="tiny-bpe-gpt2")


def tinystories(split: str = "valid", n: int = 60, words: int = 60) -> list[str]:
    """The first `n` bundled TinyStories of the split, each cut to its first `words` words."""
    text = (ROOT / "data" / "tinystories" / f"{split}.txt").read_text()
    stories = [" ".join(s.split()[:words]) for s in text.split("<|endoftext|>") if s.strip()]
    return stories[:n]


def shrink_released_spec(raw: dict, tmp: Path, name: str) -> dict:
    """A released-checkpoint spec (a YAML mapping) made to run here: a tiny local GPT-2 evaluator saved under `tmp`,
    TinyStories blocks of 16 GPT-2 tokens, 4 samples, no cluster profile; the study named `name`. In place."""
    ev = gpt2_evaluator(seed=1)
    ev.model.save_pretrained(tmp / "evaluator")
    ev.tokenizer.save_pretrained(tmp / "evaluator")
    raw["name"] = name
    raw["data"] = {
        "kind": "text",
        "train": str(ROOT / "data/tinystories/train.txt"),
        "valid": str(ROOT / "data/tinystories/valid.txt"),
        "tokenizer": "gpt2",
        "seq_len": 16,
        "max_train_blocks": 8,
        "max_valid_blocks": 8,
    }
    raw["sampling"] = {"n_samples": 4, "batch_size": 4, "seed": 0}
    raw["evaluator"] = {"kind": "hf", "name": str(tmp / "evaluator")}
    raw.pop("cluster")
    return raw
