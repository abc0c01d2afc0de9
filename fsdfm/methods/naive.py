"""Kind "naive": model-free sanity rows (fsdfm.naive) that show, in the main table, which metric each degenerate
output fools: "unigram" (i.i.d. training unigram), "repeat_top" (the top training token repeated), "copy_ngram" (a span
of the training split copied).

Registers on itself: its three rules (update rules restricted to this kind, so `fsdfm ls rules` lists them and no
other kind accepts them), its planning (one `fit_naive` stage: the token counts of the training split), the stage
and the sampler "naive". The kind is a sanity baseline (`MethodKind.sanity`): the report shows its rows, labelled,
and never marks them best.

Settings: no network, so no `teacher`, `distill`, `knobs`, `source`, `scheduler` or `loss` (each is refused by the
checks every kind shares, naming the key); `train` (and the study's training seed) is ignored. `budgets` is required as for every kind (the spec schema's 1..4096 integers) and means
nothing here: give [1]; every budget draws the same samples with NFE 0 (the sample stage records it).

Versions: the sample stage's declared sources list the samplers of the built-in kinds only, so the code that draws
(this file and fsdfm.naive) is in the sources of `fit_naive`; a change to a draw bumps fit_naive's version, which
changes the id of the sample stages built on it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fsdfm.io import atomic_write
from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import DATA_SOURCES, SAMPLERS, ArtefactError, Draw, corpus_for
from fsdfm.naive import NAIVE_RULES, TokenCounts, count_tokens, training_stream
from fsdfm.samplers import get_rule, register_rule
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec

KIND = "naive"
COUNTS = "counts.npy"

for _rule in NAIVE_RULES:
    register_rule(_rule.name, kinds=(KIND,))(_rule)


def plan_naive(p: Planner, name: str, m: MethodSpec) -> Stage:
    """One fit stage per dataset (shared by every naive method of the study): nothing but the data config."""
    return p.add(Stage("fit_naive", {"data": p.data}))


register_kind(
    MethodKind(KIND, KIND, tuple(r.name for r in NAIVE_RULES), plan_naive, sanity=True),
)


@stage_kind(
    "fit_naive",
    resources="cpu",
    version="1",
    sources=("fsdfm.methods.naive", "fsdfm.naive", *DATA_SOURCES),
    model_sampler=KIND,
    model_rule=NAIVE_RULES[0].name,
)
def fit_naive(config: dict, inputs: dict, out_dir: Path) -> dict:
    """c(v) over the training split (the blocks the study's other methods train on), saved as counts.npy (V,)."""
    corpus = corpus_for(config, out_dir)
    counts = count_tokens(corpus.train, corpus.vocab_size, corpus.eos_id)
    buf = io.BytesIO()
    np.save(buf, counts.counts)
    atomic_write(Path(out_dir) / COUNTS, buf.getvalue())
    return {
        "metrics": {},
        "train_tokens": counts.n_tokens,
        "distinct_train_tokens": int((counts.counts > 0).sum()),
        "top_token": counts.top_token,
        "eos_id": corpus.eos_id,
    }


def load_counts(model_dir: Path, eos_id: int | None) -> TokenCounts:
    path = Path(model_dir) / COUNTS
    try:
        counts = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's errors for a truncated file name no file
        raise ArtefactError(
            f"{path}: cannot be read as token counts ({type(e).__name__}: {e}); re-run the study, "
            "which redoes damaged stages"
        ) from e
    return TokenCounts(counts.astype(np.int64), eos_id)


@SAMPLERS.register(KIND)
def sample_naive(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    """The rule's draw from the fitted counts (and, for copy_ngram, the training split the sample stage loads from
    the same data config). No network: the draw reports NFE 0 itself, so the Draw has no counter."""
    counts = load_counts(model_dir, corpus.eos_id)
    if counts.counts.shape != (corpus.vocab_size,):
        raise ArtefactError(f"{Path(model_dir) / COUNTS}: {counts.counts.shape[0]} counts for V = {corpus.vocab_size}")
    rule, stream = get_rule(cfg["rule"]), training_stream(corpus.train)
    return Draw(lambda gen: rule.sample(counts, stream, cfg["n_samples"], corpus.seq_len, gen))
