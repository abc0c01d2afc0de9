"""Kind "released": a released checkpoint evaluated without training: apple/ml-fs-dfm's FS-DFM / DFM 1.3B
(`family: fsdfm`, the default) or a mask-source MDLM-family model, MDLM OWT or an SDTT student (`family: mdlm`).

Registers on itself: its settings (`checkpoint:` builds `ReleasedCheckpoint`), its planning (a load_released
stage that checks the file and writes a pointer to it) and the stage `load_released`; the pointed-to model is
then sampled and evaluated like any DFM-family model (sampler "dfm"; fsdfm.methods.common.load_dit follows
the pointer). The uniform-state Duo / DCD checkpoints are kind "released_duo" (Duo's sampler).
Reading the checkpoint files is fsdfm.released_checkpoints' (fsdfm) and fsdfm.released_mdlm's (mdlm, duo).
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
from fsdfm.released_mdlm import WHICH, load_mdlm_family

RELEASED_ENTRIES = ("student_ema", "student", "teacher")
# family -> the `which` values it reads, its default first
FAMILY_ENTRIES = {"fsdfm": RELEASED_ENTRIES, "mdlm": WHICH}


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released checkpoint to evaluate without training.

    path: the file (relative to the working directory); family: "fsdfm" (apple/ml-fs-dfm .pth) or "mdlm" (MDLM OWT,
    SDTT students: HF model.safetensors or a Lightning-style {"state_dict", "ema"} file; fsdfm.released_mdlm).
    which: fsdfm: "student_ema" (the FS-DFM EMA student, what the official evaluation uses), "student" or "teacher"
        (the DFM weights: the DFM 1.3B file's "model", or a distillation file's frozen "teacher_model");
        mdlm: "auto" (the EMA copy when the file has one, as their evaluation), "ema" or "weights".
    """

    SPEC_HINT: ClassVar[str] = (
        f"{{path: <file>, family: fsdfm | mdlm, which: {' | '.join(RELEASED_ENTRIES)} (fsdfm), "
        f"{' | '.join(WHICH)} (mdlm)}}"
    )

    path: str
    which: str | None = None
    family: str = "fsdfm"

    def __post_init__(self):
        if self.family not in FAMILY_ENTRIES:
            raise ValueError(
                f"family must be one of {', '.join(FAMILY_ENTRIES)} (Duo: kind released_duo), got "
                f"{self.family!r}{did_you_mean(str(self.family), list(FAMILY_ENTRIES))}"
            )
        entries = FAMILY_ENTRIES[self.family]
        if self.which is None:
            object.__setattr__(self, "which", entries[0])
        if self.which not in entries:
            raise ValueError(
                f"which must be one of {', '.join(entries)} (family {self.family}), got {self.which!r}"
                f"{did_you_mean(str(self.which), list(entries))}"
            )


def checkpoint_config(settings) -> dict:
    """The stage config's `checkpoint`: the settings, `family` only when not "fsdfm" (so that the stage ids of every
    study written before families existed are unchanged)."""
    out = dataclasses.asdict(settings)
    if out.get("family") == "fsdfm":
        del out["family"]
    return out


def plan_released(p: Planner, name: str, m: MethodSpec) -> Stage:
    return p.add(
        Stage(
            "load_released",
            {
                "data": p.data,
                "checkpoint": checkpoint_config(m.settings),
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
    sources=(
        "fsdfm.methods.released:load_released_stage",
        "fsdfm.methods.released:write_pointer",
        "fsdfm.released_checkpoints",
        "fsdfm.released_mdlm",
        *DATA_SOURCES,
    ),
    model_sampler="dfm",
    model_rule="cumulative_scalar",
)
def load_released_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """A released checkpoint as the model of a method, no training: load it once (every name and shape checked by
    fsdfm.released_checkpoints or fsdfm.released_mdlm), check its vocabulary against the corpus, write a pointer."""
    corpus = corpus_for(config, out_dir)
    ckpt = config["checkpoint"]
    family = ckpt.get("family", "fsdfm")
    file = Path(ckpt["path"]).resolve()
    if family == "fsdfm":
        loaded = load_released(file, ckpt["which"])
        h_wanted = ckpt["which"] != "teacher"
        if loaded.h_conditioned != h_wanted:
            raise CheckpointError(
                f"{file} [{loaded.source_key!r}]: which={ckpt['which']!r} expects a model "
                f"{'with' if h_wanted else 'without'} step-size conditioning"
            )
    else:
        if config["source"] != "mask":  # their SUBS model: mask id V, the mask row of the output dropped
            raise CheckpointError(f"{file}: a family {family} checkpoint is a mask-source model; set source: mask")
        loaded = load_mdlm_family(file, family, ckpt["which"], vocab_size=corpus.vocab_size)
    return write_pointer(config, out_dir, corpus, file, loaded)


def write_pointer(config: dict, out_dir: Path, corpus, file: Path, loaded) -> dict:
    """Check the loaded model against the corpus (V, L), write out_dir/released.json and the tokenizer; the payload."""
    ckpt = config["checkpoint"]
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
        **({"family": ckpt["family"]} if "family" in ckpt else {}),
    }
    atomic_write(Path(out_dir) / RELEASED_POINTER, json.dumps(pointer, indent=1).encode())
    save_tokenizer(out_dir, corpus)
    return {"metrics": {"n_params": loaded.model.num_parameters()}, "checkpoint": pointer}
