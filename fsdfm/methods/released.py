"""Kind "released": a released apple/ml-fs-dfm checkpoint evaluated without training.

Registers on itself: its settings (`checkpoint:` builds `ReleasedCheckpoint`), its planning (a load_released
stage that checks the file and writes a pointer to it) and the stage `load_released`; the pointed-to model is
then sampled and evaluated like any DFM-family model (sampler "dfm"; fsdfm.methods.common.load_dit follows
the pointer).
Reading the checkpoint file itself is fsdfm.released_checkpoints'.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


from fsdfm.methods.base import MethodKind, Planner, declared_rules, register_kind
from fsdfm.methods.common import DATA_SOURCES, RELEASED_POINTER, corpus_for, save_tokenizer
from fsdfm.registry import did_you_mean
from fsdfm.io import atomic_write
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.released_checkpoints import CheckpointError, load_released

RELEASED_ENTRIES = ("student_ema", "student", "teacher")


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released checkpoint to evaluate without training.

    path: the .pth file (relative to the working directory); which: the entry to load, "student_ema" (the FS-DFM
        EMA student, what the official evaluation uses), "student" or "teacher" (the DFM weights: the DFM 1.3B
        file's "model", or a distillation file's frozen "teacher_model").
    """

    SPEC_HINT: ClassVar[str] = f"{{path: <file.pth>, which: {' | '.join(RELEASED_ENTRIES)}}}"

    path: str
    which: str = "student_ema"

    def __post_init__(self):
        if self.which not in RELEASED_ENTRIES:
            raise ValueError(
                f"which must be one of {', '.join(RELEASED_ENTRIES)}, got {self.which!r}"
                f"{did_you_mean(str(self.which), list(RELEASED_ENTRIES))}"
            )


def plan_released(p: Planner, name: str, m: MethodSpec) -> Stage:
    return p.add(
        Stage(
            "load_released",
            {
                "data": p.data,
                "checkpoint": dataclasses.asdict(m.settings),
                "source": m.source,
                "scheduler": dataclasses.asdict(m.scheduler),
            },
        )
    )


register_kind(
    MethodKind(
        "released",
        "dfm",
        declared_rules("released", "cumulative_scalar"),
        plan_released,
        teacher_kind="released",
        teacher_optional=True,
        settings_key="checkpoint",
        settings_cls=ReleasedCheckpoint,
        settings_required=True,
        pos_divergence=True,
        ends_before_one=lambda m: m.loss == "gkl" and m.settings.which == "teacher",
    )
)


@stage_kind(
    "load_released",
    resources="gpu",
    version="1",
    sources=("fsdfm.methods.released:load_released_stage", "fsdfm.released_checkpoints", *DATA_SOURCES),
    model_sampler="dfm",
    model_rule="cumulative_scalar",
)
def load_released_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """A released apple/ml-fs-dfm checkpoint as the model of a method, no training: load it once (every name and
    shape checked by fsdfm.released_checkpoints), check its vocabulary against the corpus, write a pointer to it."""
    corpus = corpus_for(config, out_dir)
    ckpt = config["checkpoint"]
    file = Path(ckpt["path"]).resolve()
    loaded = load_released(file, ckpt["which"])
    h_wanted = ckpt["which"] != "teacher"
    if loaded.h_conditioned != h_wanted:
        raise CheckpointError(
            f"{file} [{loaded.source_key!r}]: which={ckpt['which']!r} expects a model "
            f"{'with' if h_wanted else 'without'} step-size conditioning"
        )
    if loaded.config.vocab_size != corpus.vocab_size or loaded.config.seq_len < corpus.seq_len:
        raise CheckpointError(
            f"{file}: the model has V = {loaded.config.vocab_size}, L <= {loaded.config.seq_len}; "
            f"the corpus V = {corpus.vocab_size}, L = {corpus.seq_len}: they must agree"
        )
    stat = file.stat()
    pointer = {
        "checkpoint": str(file),
        "which": ckpt["which"],
        "source_key": loaded.source_key,
        "size_bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "model_config": loaded.config.to_dict(),
        "path": {"source": config["source"], "scheduler": config["scheduler"]},
        "h_conditioned": loaded.h_conditioned,
    }
    atomic_write(Path(out_dir) / RELEASED_POINTER, json.dumps(pointer, indent=1).encode())
    save_tokenizer(out_dir, corpus)
    return {"metrics": {"n_params": loaded.model.num_parameters()}, "checkpoint": pointer}
