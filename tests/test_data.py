"""Tests of fsdfm.data: tokenizers, documents, packing, the text / tokens / hf kinds, caching and errors.

Known answers: GPT-2 ids of "Hello world"; GPT-2 token counts from data/tinystories/README.md; hand-packed
blocks; block counts recomputed independently from the documents' ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fsdfm.data.text as text_kind
import fsdfm.data.tokenizer as tokenizer_mod
from fsdfm.data.hf import hf_datasets_cache
from fsdfm.data import (
    DATASET_KINDS,
    PAPER_DATASETS,
    Corpus,
    DataConfig,
    DataError,
    check_corpus,
    load_corpus,
    load_gpt2_tokenizer,
    load_token_samples,
    load_tokenizer,
    pack_blocks,
    read_documents,
    save_token_samples,
    split_documents,
    train_bpe,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TRAIN, VALID = DATA / "tinystories" / "train.txt", DATA / "tinystories" / "valid.txt"
SEP = "\n<|endoftext|>\n"


def _stories(path: Path, n: int) -> str:
    return SEP.join(path.read_text(encoding="utf-8").split(SEP)[:n]) + SEP


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A TinyStories slice (120 train / 40 valid stories) in the bundled file format."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "train.txt").write_text(_stories(TRAIN, 120), encoding="utf-8")
    (d / "valid.txt").write_text(_stories(VALID, 40), encoding="utf-8")
    return {"train": d / "train.txt", "valid": d / "valid.txt"}


@pytest.fixture(scope="module")
def bpe512(small, tmp_path_factory):
    return train_bpe(small["train"], 512, tmp_path_factory.mktemp("bpe-cache"))


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


# --- tokenizers --------------------------------------------------------------------------------------------


def test_gpt2_known_answers(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)
    # data/tinystories/README.md: valid.txt has 196,559 GPT-2 tokens.
    assert len(gpt2.encode(VALID.read_text(encoding="utf-8"))) == 196_559
    hf = gpt2.to_hf()
    assert hf("Hello world")["input_ids"] == [15496, 995]
    assert hf.eos_token_id == hf.pad_token_id == hf.bos_token_id == 50256
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_load_gpt2_rejects_other_tokenizer(bpe512, tmp_path):
    bpe512.save(tmp_path / "tok")
    with pytest.raises(DataError, match="not GPT-2's tokenizer"):
        load_gpt2_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match="does not exist"):
        load_gpt2_tokenizer(tmp_path / "nowhere")


def test_bpe_round_trip(bpe512):
    assert (bpe512.vocab_size, bpe512.eos_id) == (512, 0)
    for x in ["Once upon a time, Lily found a needle.", "  two  spaces\n\nand\ttabs ", "“curly” â€œ naïve 😀", ""]:
        ids = bpe512.encode(x)
        assert all(0 <= i < 512 for i in ids)
        assert bpe512.decode(ids) == x
    assert bpe512.decode_batch(bpe512.encode_batch(["a cat", "the dog"])) == ["a cat", "the dog"]
    # BPE merges compress: fewer ids than bytes on in-domain text.
    story = "Once upon a time, there was a little girl named Lily. She liked to play."
    assert len(bpe512.encode(story)) < 0.6 * len(story.encode())


def test_decode_rejects_ids_outside_vocab(bpe512):
    with pytest.raises(DataError, match="cannot decode id 512 at sequence 0, position 1"):
        bpe512.decode([5, 512])


def test_bpe_deterministic_and_cached(small, tmp_path, monkeypatch):
    a = train_bpe(small["train"], 300, tmp_path / "a")
    b = train_bpe(small["train"], 300, tmp_path / "b")
    json_a = (tmp_path / "a" / "tokenizers" / a.name / "tokenizer.json").read_bytes()
    json_b = (tmp_path / "b" / "tokenizers" / b.name / "tokenizer.json").read_bytes()
    assert a.name == b.name and json_a == json_b
    assert train_bpe(small["train"], 301, tmp_path / "a").name != a.name  # the size is part of the key

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_mod, "_train_bpe_backend", no_training)
    c = train_bpe(small["train"], 300, tmp_path / "a")
    assert c.fingerprint == a.fingerprint and c.encode("a big dog") == a.encode("a big dog")


def test_bpe_errors(small, tmp_path):
    with pytest.raises(DataError, match="vocab_size must be an integer >= 257"):
        train_bpe(small["train"], 100, tmp_path)
    with pytest.raises(DataError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 512, tmp_path)


def test_save_and_load_tokenizer(bpe512, tmp_path):
    bpe512.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    for spec in (str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
        again = load_tokenizer(spec)
        assert again.fingerprint == bpe512.fingerprint and again.eos_id == 0
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    with pytest.raises(DataError, match="did you mean 'gpt2'"):
        load_tokenizer("gtp2")
    with pytest.raises(DataError, match="no train file"):
        load_tokenizer("bpe")


# --- documents and packing ----------------------------------------------------------------------------------


def test_split_documents_separator_and_paragraph_modes():
    stories = "First story.\n\nIts second paragraph.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n"
    assert split_documents(stories) == ["First story.\n\nIts second paragraph.", "Second story."]
    wiki = " \n = Title = \n \n Body line one . \n Body line two . \n \n"
    assert split_documents(wiki) == ["= Title =", "Body line one . \n Body line two ."]
    assert split_documents("a\r\n\r\nb\r\n") == ["a", "b"]


def test_read_documents_bundled_files():
    assert len(read_documents(TRAIN)) == 2316 and len(read_documents(VALID)) == 1000
    docs = read_documents(TRAIN)
    assert docs[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert all("<|endoftext|>" not in d for d in docs)
    wiki = read_documents(DATA / "wikitext2" / "wiki.valid.tokens")
    assert wiki[0] == "= Homarus gammarus =" and wiki[1].startswith("Homarus gammarus , known as")


def test_read_documents_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt.*does not exist"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(DataError, match=r"empty\.txt.*is empty"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "seps.txt").write_text("<|endoftext|>\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"seps\.txt.*no documents"):
        read_documents(tmp_path / "seps.txt")


def test_pack_blocks_known_answer():
    docs = [[1, 2, 3], [4, 5], [6]]  # stream: 1 2 3 E 4 5 E 6 E with E = 0
    assert pack_blocks(docs, 3, 0).tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    out = pack_blocks(docs, 4, 0)  # 9 ids -> 2 blocks; the tail remainder [E] is dropped
    assert out.dtype == np.int64 and out.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert pack_blocks(docs, 2, None).tolist() == [[1, 2], [3, 4], [5, 6]]
    assert pack_blocks(docs, 10, 0).shape == (0, 10)


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "txt"}, "did you mean 'text'"),
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"vocab_size": -3}, "vocab_size must be a positive integer or None, got -3"),
        ({"max_train_blocks": 1.5}, "max_train_blocks"),
        ({"dtype": "float32"}, "dtype must name a numpy integer dtype"),
        ({"train": ""}, "DataConfig.train"),
    ],
)
def test_data_config_validation(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_dataset_kinds_registered():
    assert {"text", "tokens", "hf"} <= set(DATASET_KINDS.names())
    assert set(PAPER_DATASETS) == {"openwebtext", "fineweb-edu", "wikitext-103", "lm1b"}


# --- kind "text" ---------------------------------------------------------------------------------------------


def test_text_corpus_blocks_and_cache(small, bpe512, tmp_path, monkeypatch):
    cfg = DataConfig(train=str(small["train"]), valid=str(small["valid"]), vocab_size=512, seq_len=64)
    corpus = load_corpus(cfg, tmp_path)
    # Independent computation: documents' ids with EOS after each, cut into 64-id blocks.
    stream = [i for doc in read_documents(small["valid"]) for i in bpe512.encode(doc) + [0]]
    n = len(stream) // 64
    assert corpus.valid.dtype == torch.long and corpus.valid.tolist() == np.reshape(stream[: n * 64], (n, 64)).tolist()
    assert (corpus.vocab_size, corpus.eos_id, corpus.seq_len) == (512, 0, 64)
    assert corpus.tokenizer.fingerprint != "" and corpus.train.shape[1] == 64

    def no_reading(path):
        raise AssertionError("packed blocks should come from the cache")

    monkeypatch.setattr(text_kind, "read_documents", no_reading)
    monkeypatch.setattr(tokenizer_mod, "read_documents", no_reading)
    again = load_corpus(cfg, tmp_path)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.valid, corpus.valid)

    limited = load_corpus(DataConfig(**{**vars(cfg), "max_train_blocks": 5, "max_valid_blocks": 2}), tmp_path)
    assert limited.train.shape == (5, 64) and torch.equal(limited.valid, corpus.valid[:2])


def test_corpus_texts(small, tmp_path):
    corpus = load_corpus(
        DataConfig(train=str(small["train"]), valid=str(small["valid"]), vocab_size=512, seq_len=32), tmp_path
    )
    texts = corpus.texts("valid", 8)
    docs = read_documents(small["valid"])
    assert len(texts) == 8 and "".join(texts).startswith(docs[0] + "<|endoftext|>" + docs[1][:20])
    assert "".join(corpus.texts("valid", 8, skip_special_tokens=True)).startswith(docs[0] + docs[1][:20])
    with pytest.raises(DataError, match=f"has {len(corpus.valid)} blocks"):
        corpus.texts("valid", len(corpus.valid) + 1)
    with pytest.raises(DataError, match="unknown split 'test'"):
        corpus.texts("test")
    bare = Corpus(train=corpus.train, valid=corpus.valid, vocab_size=512, name="bare")
    with pytest.raises(DataError, match="'bare' has no tokenizer"):
        bare.texts("valid", 1)


def test_text_corpus_errors(small, tmp_path):
    ok = {"train": str(small["train"]), "valid": str(small["valid"]), "vocab_size": 512}
    with pytest.raises(DataError, match="seq_len=2048 exceeds the model's max_seq_len=1024"):
        load_corpus(DataConfig(**ok, seq_len=2048), tmp_path, max_seq_len=1024)
    with pytest.raises(DataError, match=r"DataConfig.valid: file '.*missing\.txt' does not exist"):
        load_corpus(DataConfig(**{**ok, "valid": str(tmp_path / "missing.txt")}), tmp_path)
    (tmp_path / "tiny.txt").write_text("A cat.\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"tiny\.txt' gives no block of seq_len=64 tokens \(it has \d+ tokens\)"):
        load_corpus(DataConfig(**{**ok, "valid": str(tmp_path / "tiny.txt")}, seq_len=64), tmp_path)
    with pytest.raises(DataError, match="vocab_size=1000 is smaller than tokenizer 'gpt2'"):
        load_corpus(DataConfig(**{**ok, "vocab_size": 1000}, tokenizer="gpt2"), tmp_path)
    with pytest.raises(DataError, match="DataConfig.train is not set"):
        load_corpus(DataConfig(valid=str(small["valid"])), tmp_path)


def test_check_corpus_catches_ids_outside_vocab():
    x = torch.tensor([[1, 2], [3, 9]])
    with pytest.raises(DataError, match=r"ids must lie in \[0, 8\) but block 1 holds 9"):
        check_corpus(Corpus(train=x, valid=x, vocab_size=8, name="fake"), seq_len=2)
    with pytest.raises(DataError, match="valid split is empty"):
        check_corpus(Corpus(train=x, valid=x[:0], vocab_size=10, name="fake"), seq_len=2)


def test_tinystories_bpe2048_full(tmp_path):
    """The demo corpus: BPE-2048 on the whole bundled train split, 64-token blocks."""
    corpus = load_corpus(DataConfig(train=str(TRAIN), valid=str(VALID), vocab_size=2048, seq_len=64), tmp_path)
    tok = corpus.tokenizer
    assert corpus.vocab_size == tok.vocab_size == 2048
    n_ids = sum(len(ids) + 1 for ids in tok.encode_batch(read_documents(VALID)))  # documents + one EOS each
    assert corpus.valid.shape == (n_ids // 64, 64)
    assert corpus.train.shape[0] > 2 * corpus.valid.shape[0]  # train.txt is 2.6x the bytes of valid.txt
    assert corpus.texts("train", 1)[0].startswith("One day, a little girl named Lily found a needle")


# --- kind "tokens" and sample files ---------------------------------------------------------------------------


def test_token_files_npy_and_bin(tmp_path):
    seqs = np.arange(4 * 10).reshape(4, 10) % 50
    np.save(tmp_path / "seqs.npy", seqs)
    stream = (np.arange(25) % 50).astype(np.uint16)
    stream.tofile(tmp_path / "stream.bin")
    np.save(tmp_path / "stream.npy", stream.astype(np.int32))

    exact = load_corpus(
        DataConfig(
            kind="tokens", train=str(tmp_path / "seqs.npy"), valid=str(tmp_path / "seqs.npy"), vocab_size=50, seq_len=10
        ),
        tmp_path,
    )
    assert exact.train.dtype == torch.long and exact.train.tolist() == seqs.tolist()
    assert exact.eos_id is None and exact.tokenizer is None
    cut = load_corpus(
        DataConfig(
            kind="tokens", train=str(tmp_path / "seqs.npy"), valid=str(tmp_path / "seqs.npy"), vocab_size=50, seq_len=6
        ),
        tmp_path,
    )
    assert cut.train.tolist() == seqs[:, :6].tolist()
    for name, dtype in (("stream.bin", "uint16"), ("stream.npy", None)):
        c = load_corpus(
            DataConfig(
                kind="tokens",
                train=str(tmp_path / name),
                valid=str(tmp_path / "seqs.npy"),
                vocab_size=50,
                seq_len=8,
                dtype=dtype,
            ),
            tmp_path,
        )
        assert c.train.tolist() == np.arange(24).reshape(3, 8).tolist()  # 25 ids -> 3 blocks, tail dropped


def test_token_file_errors(tmp_path):
    bad = np.zeros((3, 8), dtype=np.int64)
    bad[1, 2] = 77
    np.save(tmp_path / "bad.npy", bad)
    np.save(tmp_path / "ok.npy", np.zeros((3, 8), dtype=np.int64))
    np.save(tmp_path / "floats.npy", np.zeros((3, 8)))
    np.array([1, 2, 3], dtype=np.uint16).tofile(tmp_path / "odd.bin")
    (tmp_path / "odd.bin").write_bytes((tmp_path / "odd.bin").read_bytes() + b"\x00")
    np.array([1, 2, 999], dtype=np.uint16).tofile(tmp_path / "big.bin")

    def load(train, **kw):
        base = {
            "kind": "tokens",
            "train": str(tmp_path / train),
            "valid": str(tmp_path / "ok.npy"),
            "vocab_size": 50,
            "seq_len": 8,
        }
        return load_corpus(DataConfig(**{**base, **kw}), tmp_path)

    with pytest.raises(DataError, match=r"bad\.npy.*id 77 at row 1, column 2 is outside the declared vocabulary"):
        load("bad.npy")
    with pytest.raises(DataError, match=r"big\.bin'.*id 999 at index 2"):
        load("big.bin", dtype="uint16", seq_len=2)
    with pytest.raises(DataError, match="vocab_size is required for kind 'tokens'"):
        load("ok.npy", vocab_size=None)
    with pytest.raises(DataError, match="set DataConfig.dtype"):
        load("big.bin")
    with pytest.raises(DataError, match="not a multiple of 2"):
        load("odd.bin", dtype="uint16")
    with pytest.raises(DataError, match="holds float64 values"):
        load("floats.npy")
    with pytest.raises(DataError, match="length 8, shorter than seq_len=16"):
        load("ok.npy", seq_len=16)
    with pytest.raises(DataError, match="suffix '.txt'"):
        load_corpus(DataConfig(kind="tokens", train=str(TRAIN), valid=str(TRAIN), vocab_size=50, seq_len=8), tmp_path)
    with pytest.raises(DataError, match="'bpe' trains on text"):
        load("ok.npy", tokenizer="bpe")


def test_token_samples_round_trip(tmp_path, gpt2):
    tokens = torch.randint(0, 50257, (6, 16), generator=torch.Generator().manual_seed(0))
    path = save_token_samples(tmp_path / "samples.npy", tokens)
    back = load_token_samples(path)
    assert back.dtype == np.int64 and np.array_equal(back, tokens.numpy())
    # Sample files are a valid "tokens" split, decodable with the tokenizer they came from.
    c = load_corpus(
        DataConfig(kind="tokens", train=str(path), valid=str(path), vocab_size=50257, seq_len=16, tokenizer="gpt2"),
        tmp_path,
    )
    assert torch.equal(c.valid, tokens) and c.eos_id == 50256 and c.texts("valid", 1)[0] == gpt2.decode(tokens[0])
    with pytest.raises(DataError, match="must be a 2-D integer array"):
        save_token_samples(tmp_path / "x.npy", torch.zeros(5))
    with pytest.raises(DataError, match="does not exist"):
        load_token_samples(tmp_path / "none.npy")


# --- kind "hf" -------------------------------------------------------------------------------------------------


def test_hf_local_text_matches_text_kind(small, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    files = {"train": str(small["train"]), "valid": str(small["valid"])}
    text = load_corpus(DataConfig(kind="text", tokenizer="gpt2", seq_len=128, **files), tmp_path / "a")
    hf = load_corpus(DataConfig(kind="hf", hf_name="text", seq_len=128, **files), tmp_path / "b")
    assert hf.tokenizer.name == "gpt2" and (hf.vocab_size, hf.eos_id) == (50257, 50256)
    assert torch.equal(hf.train, text.train) and torch.equal(hf.valid, text.valid)
    assert (tmp_path / "b" / "hf_datasets").is_dir()  # datasets' cache went under cache_dir


def test_hf_local_json_matches_text_kind(small, tmp_path):
    for split in ("train", "valid"):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc in read_documents(small[split]):
                f.write(json.dumps({"story": doc}) + "\n")
    text = load_corpus(
        DataConfig(train=str(small["train"]), valid=str(small["valid"]), tokenizer="gpt2", seq_len=128), tmp_path
    )
    hf = load_corpus(
        DataConfig(
            kind="hf",
            hf_name="json",
            train=str(tmp_path / "train.jsonl"),
            valid=str(tmp_path / "valid.jsonl"),
            text_field="story",
            seq_len=128,
        ),
        tmp_path,
    )
    assert torch.equal(hf.train, text.train) and torch.equal(hf.valid, text.valid)
    with pytest.raises(DataError, match="text_field='text' is not a column of the dataset; columns: story"):
        load_corpus(
            DataConfig(
                kind="hf",
                hf_name="json",
                train=str(tmp_path / "train.jsonl"),
                valid=str(tmp_path / "valid.jsonl"),
                seq_len=64,
            ),
            tmp_path / "other",
        )


def test_hf_hub_dataset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"(?s)'Skylion007/openwebtext'.*not available offline.*load_dataset\("):
        load_corpus(DataConfig(kind="hf", hf_name="openwebtext", seq_len=1024), tmp_path)
    with pytest.raises(DataError, match="hf_name is required for kind 'hf'"):
        load_corpus(DataConfig(kind="hf", seq_len=64), tmp_path)
    with pytest.raises(DataError, match="'bpe' trains on a local text file"):
        load_corpus(DataConfig(kind="hf", hf_name="wikitext-103", tokenizer="bpe"), tmp_path)


def test_hf_datasets_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    assert hf_datasets_cache(tmp_path) == str(tmp_path / "hf_datasets") and hf_datasets_cache(None) is None
    monkeypatch.setenv("HF_DATASETS_CACHE", "/scratch/hf")
    assert hf_datasets_cache(tmp_path) == "/scratch/hf"
