"""Text tokenizers: a byte-level BPE trained on the train split, and GPT-2's.

Both are `tokenizers.Tokenizer` objects behind one small wrapper, `TextTokenizer`. Byte-level BPE maps every
string to ids and back exactly (decode(encode(x)) == x), and `<|endoftext|>` is the special EOS token placed
between documents.

transformers 5.x pitfall: `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an *empty*
tokenizer, so GPT-2 is loaded from tokenizer.json with `tokenizers` and checked on a known answer.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fsdfm.data.base import DataError, digest, require_file
from fsdfm.data.documents import EOS_TOKEN, read_documents
from fsdfm.io import atomic_write, sha256_file
from fsdfm.registry import Registry, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BPE_RECIPE = "byte-level-bpe-v1"
DEFAULT_BPE_VOCAB_SIZE = 2048
MIN_BPE_VOCAB_SIZE = 256 + 1  # every byte, plus EOS
GPT2_DIR = Path(__file__).resolve().parents[2] / "data" / "gpt2_tokenizer"
GPT2_KNOWN_ANSWER = ("Hello world", [15496, 995])
# EOS spellings accepted in a foreign tokenizer.json, in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` with its EOS id and vocabulary size V (ids lie in [0, V))."""

    backend: Tokenizer = field(repr=False, compare=False)
    name: str
    eos_id: int
    vocab_size: int

    @classmethod
    def from_backend(cls, backend: Tokenizer, name: str) -> TextTokenizer:
        eos_id = next((backend.token_to_id(t) for t in EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
        if eos_id is None:
            raise DataError(f"tokenizer {name!r} has no EOS token; expected one of {', '.join(EOS_CANDIDATES)}")
        return cls(backend=backend, name=name, eos_id=eos_id, vocab_size=backend.get_vocab_size(with_added_tokens=True))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: part of every cache key of data it produced."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; tokenizers parallelises it over CPU cores.
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ids (list, 1-D ndarray or tensor). EOS is kept as `<|endoftext|>` unless skipped."""
        return self.decode_batch([ids], skip_special_tokens)[0]

    def decode_batch(self, batch: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences ((B, L) tensor/ndarray or list of lists).

        An id outside [0, V) (e.g. a leftover mask token) is a DataError, not silently dropped text.
        """
        if hasattr(batch, "tolist"):  # tensor / ndarray (B, L)
            rows = batch.tolist()
        else:
            rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in batch]
        for i, row in enumerate(rows):
            if row and (min(row) < 0 or max(row) >= self.vocab_size):
                j = next(j for j, t in enumerate(row) if not 0 <= t < self.vocab_size)
                raise DataError(
                    f"tokenizer {self.name!r}: cannot decode id {row[j]} at sequence {i}, position {j}; "
                    f"ids must lie in [0, {self.vocab_size})"
                )
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def to_hf(self) -> PreTrainedTokenizerFast:
        """A transformers tokenizer (EOS = BOS = UNK = PAD = the EOS token, as GPT-2 models expect)."""
        from transformers import PreTrainedTokenizerFast

        eos = self.eos_token
        # A copy: transformers may set padding/truncation on the object it is given.
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(self.backend.to_str()),
            eos_token=eos,
            bos_token=eos,
            unk_token=eos,
            pad_token=eos,
        )

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json (exact) and transformers' tokenizer_config.json into `directory`."""
        d = Path(directory)
        self.to_hf().save_pretrained(str(d))
        atomic_write(d / "tokenizer.json", lambda f: f.write(self.backend.to_str(pretty=True).encode()))
        return d


def _train_bpe_backend(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """GPT-2-style byte-level BPE: regex pre-split, 256 byte symbols, merges up to `vocab_size` (EOS is id 0).

    Training is deterministic: pair-count ties are broken by the pair itself, not by thread scheduling.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return backend


def bpe_cache_key(train_path: str | Path, vocab_size: int) -> str:
    """sha256 of the BPE recipe: the train file's content, vocab_size, the recipe and the `tokenizers` version."""
    return digest(
        {
            "recipe": BPE_RECIPE,
            "file": sha256_file(train_path),
            "vocab_size": int(vocab_size),
            "tokenizers": tokenizers.__version__,
        }
    )


def bpe_cache_path(train_path: str | Path, vocab_size: int, cache_dir: str | Path | None) -> Path | None:
    """Where `train_bpe` caches this tokenizer (None without a cache_dir); the file may not exist yet."""
    if cache_dir is None:
        return None
    name = f"bpe{vocab_size}-" + bpe_cache_key(train_path, vocab_size)[:10]
    return Path(cache_dir) / "tokenizers" / name / "tokenizer.json"


def train_bpe(
    train_path: str | Path, vocab_size: int = DEFAULT_BPE_VOCAB_SIZE, cache_dir: str | Path | None = None
) -> TextTokenizer:
    """Byte-level BPE trained on the documents of `train_path`, cached in `cache_dir/tokenizers/`.

    The cache key hashes the file's content, vocab_size, the recipe and the `tokenizers` version, so the same
    file and size give the identical tokenizer.json and a second call only reads it.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(
            f"BPE vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 bytes + EOS), got {vocab_size!r}"
        )
    require_file(train_path, "BPE train file")
    path = bpe_cache_path(train_path, vocab_size, cache_dir)
    name = f"bpe{vocab_size}-" + bpe_cache_key(train_path, vocab_size)[:10]
    if path is not None and path.is_file():
        return TextTokenizer.from_backend(Tokenizer.from_file(str(path)), name)
    backend = _train_bpe_backend(read_documents(train_path), int(vocab_size))
    if path is not None:
        atomic_write(path, lambda f: f.write(backend.to_str(pretty=True).encode()))
    return TextTokenizer.from_backend(backend, name)


def tokenizer_from_file(path: str | Path, name: str | None = None) -> TextTokenizer:
    """A tokenizer.json file, or a directory holding one."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"tokenizer file {str(file)!r} does not exist")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file {str(file)!r} cannot be read: {err}") from None
    return TextTokenizer.from_backend(backend, name or str(p))


def load_gpt2_tokenizer(path: str | Path | None = None) -> TextTokenizer:
    """GPT-2's tokenizer from tokenizer.json (default: the bundled data/gpt2_tokenizer), checked on a known
    answer: encode("Hello world") == [15496, 995]."""
    tok = tokenizer_from_file(GPT2_DIR if path is None else path, name="gpt2")
    text, expected = GPT2_KNOWN_ANSWER
    got = tok.encode(text)
    if got != expected or tok.vocab_size != 50257:
        raise DataError(
            f"{str(path or GPT2_DIR)!r} is not GPT-2's tokenizer: encode({text!r}) = {got} "
            f"(expected {expected}), vocab_size = {tok.vocab_size} (expected 50257)"
        )
    return tok


TOKENIZER_SPECS: Registry = Registry("tokenizer")


@TOKENIZER_SPECS.register("bpe")
def _bpe_spec(train_path: str | Path | None, vocab_size: int | None, cache_dir: str | Path | None) -> TextTokenizer:
    if train_path is None:
        raise DataError("tokenizer 'bpe' is trained on the train split, but no train file is set")
    return train_bpe(train_path, vocab_size or DEFAULT_BPE_VOCAB_SIZE, cache_dir)


@TOKENIZER_SPECS.register("gpt2")
def _gpt2_spec(train_path: str | Path | None, vocab_size: int | None, cache_dir: str | Path | None) -> TextTokenizer:
    return load_gpt2_tokenizer()


def load_tokenizer(
    spec: str, train_path: str | Path | None = None, vocab_size: int | None = None, cache_dir: str | Path | None = None
) -> TextTokenizer:
    """Resolve a tokenizer spec: "bpe" (trained on train_path with vocab_size), "gpt2", or a path to a
    tokenizer.json file or a directory holding one."""
    if spec in TOKENIZER_SPECS:
        return TOKENIZER_SPECS.get(spec)(train_path, vocab_size, cache_dir)
    if Path(spec).exists() or "/" in spec or spec.endswith(".json"):
        return tokenizer_from_file(spec)
    raise DataError(
        f"unknown tokenizer {spec!r}{did_you_mean(spec, TOKENIZER_SPECS.names())}; allowed: "
        f"{', '.join(TOKENIZER_SPECS.names())}, or a path to a tokenizer.json file or its directory"
    )
