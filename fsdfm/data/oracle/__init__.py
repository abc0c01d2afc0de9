"""The "oracle" dataset kind: sequences drawn from a synthetic source with an exactly computable likelihood.

    data:
      kind: oracle
      seq_len: 64
      oracle: {source: markov, vocab_size: 32, order: 2, support: 4, epsilon: 0.001, seed: 0,
               n_train: 20000, n_valid: 2000}

Every key except n_train / n_valid goes to the source's constructor (`make_oracle`). Train and valid draws use
seeds derived from the source seed, so the corpus is a pure function of the config. Samples of such studies are
scored by `oracle_nll` (exact NLL per token under the source) next to the source's expected NLL per token.

The sources themselves: `sources` (the `OracleSource` interface, `ORACLES`, `make_oracle`), `markov`
(`MarkovSource`), `hmm` (`HMMSource`) and `files` (`markov_file`, `hmm_file`: a user's own chain or HMM from .npy
files); importing this package registers them. This module turns a data config into a corpus; the sources know
nothing about corpora.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsdfm.data.base import DATASET_KINDS, Corpus, DataConfig, DataError
from fsdfm.data.oracle.files import HMMFileSource, MarkovFileSource
from fsdfm.data.oracle.hmm import HMMSource
from fsdfm.data.oracle.markov import MarkovSource
from fsdfm.data.oracle.sources import ORACLES, OracleEstimate, OracleSource, de_bruijn, make_oracle, oracle_nll

# the oracle sources' code (this file is the dataset kind, part of fsdfm.methods.common.DATA_SOURCES): the
# sources of every versioned unit that reads an oracle source (fsdfm.versions)
ORACLE_SOURCES = ("fsdfm.data.oracle.sources", "fsdfm.data.oracle.markov", "fsdfm.data.oracle.hmm")

__all__ = [
    "ORACLES",
    "HMMFileSource",
    "HMMSource",
    "MarkovFileSource",
    "MarkovSource",
    "OracleEstimate",
    "OracleSource",
    "de_bruijn",
    "make_oracle",
    "oracle_nll",
    "oracle_source",
    "load_oracle_corpus",
    "SPLIT_KEYS",
]

SPLIT_KEYS = ("n_train", "n_valid")


def oracle_source(cfg: DataConfig) -> OracleSource:
    o = dict(cfg.oracle or {})
    kind = o.pop("source", None)
    for k in SPLIT_KEYS:
        o.pop(k, None)
    if kind is None:
        raise DataError("DataConfig.oracle.source: name the source (markov or hmm)")
    try:
        return make_oracle(kind, **o)
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"DataConfig.oracle: {e}") from None


@DATASET_KINDS.register("oracle")
def load_oracle_corpus(cfg: DataConfig, cache_dir: Path | None) -> Corpus:
    source = oracle_source(cfg)
    o = cfg.oracle
    seed = int(o.get("seed", 0))
    n_train, n_valid = int(o.get("n_train", 20_000)), int(o.get("n_valid", 2_000))
    train = source.sample(n_train, cfg.seq_len, seed=seed * 1000 + 1)
    valid = source.sample(n_valid, cfg.seq_len, seed=seed * 1000 + 2)
    return Corpus(
        train=torch.from_numpy(train).long(),
        valid=torch.from_numpy(valid).long(),
        vocab_size=source.vocab_size,
        eos_id=None,
        tokenizer=None,
        name=f"oracle-{o['source']}",
    )
