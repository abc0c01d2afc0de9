"""Corpora, tokenizers, packing and token files: `load_corpus(DataConfig(...), cache_dir) -> Corpus`.

Modules: base (DataConfig, Corpus, DATASET_KINDS, load_corpus, caching), documents (reading and packing),
tokenizer (byte-level BPE, GPT-2), and one module per dataset kind: text, tokenfiles ("tokens"), hf.
Importing this package registers the kinds "text", "tokens", "hf" and "oracle".
"""

from fsdfm.data.base import DATASET_KINDS, Corpus, DataConfig, DataError, check_corpus, load_corpus
from fsdfm.data.documents import EOS_TOKEN, BlockPacker, pack_blocks, read_documents, split_documents
from fsdfm.data.oracle import load_oracle_corpus, oracle_source
from fsdfm.data.hf import LOCAL_BUILDERS, PAPER_DATASETS, HFSource, load_hf_corpus
from fsdfm.data.text import load_text_corpus
from fsdfm.data.tokenfiles import load_token_corpus, load_token_samples, save_token_samples
from fsdfm.data.tokenizer import DEFAULT_BPE_VOCAB_SIZE, TextTokenizer, load_gpt2_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DATASET_KINDS",
    "DEFAULT_BPE_VOCAB_SIZE",
    "EOS_TOKEN",
    "LOCAL_BUILDERS",
    "PAPER_DATASETS",
    "BlockPacker",
    "Corpus",
    "DataConfig",
    "DataError",
    "HFSource",
    "TextTokenizer",
    "check_corpus",
    "load_corpus",
    "load_gpt2_tokenizer",
    "load_hf_corpus",
    "load_oracle_corpus",
    "oracle_source",
    "load_text_corpus",
    "load_token_corpus",
    "load_token_samples",
    "load_tokenizer",
    "pack_blocks",
    "read_documents",
    "save_token_samples",
    "split_documents",
    "train_bpe",
]
