"""Kind "released_duo": a released Duo or Duo+DCD checkpoint (s-sahoo/duo) evaluated without training.

Registers on itself: its settings (`checkpoint:` builds `ReleasedDuoCheckpoint`), its planning (a load_released_duo
stage that checks the file and writes the same pointer as kind "released") and that stage. The model is then
sampled by Duo's sampler (fsdfm.methods.duo.DUO_SAMPLER: the uniform-state ancestral posterior, rule "ancestral" or
"greedy_tail" for the authors' greedy last step) on the path it was trained for: uniform source, kappa(t) = t.
A kind of its own, not a `family:` of "released", because a kind names one sampler and Duo's is not the DFM loop.
Reading the file is fsdfm.released_mdlm's (family "usdm": sigma = -log alpha_t as time input, [PAD] row dropped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import DATA_SOURCES, corpus_for
from fsdfm.methods.duo import DUO_PATH, DUO_RULES, DUO_SAMPLER
from fsdfm.methods.released import write_pointer
from fsdfm.registry import did_you_mean
from fsdfm.released_mdlm import WHICH, load_mdlm_family
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec


@dataclass(frozen=True)
class ReleasedDuoCheckpoint:
    """path: the HF model.safetensors (s-sahoo/duo, s-sahoo/duo-distilled) or a Lightning-style {"state_dict", "ema"}
    file; which: "auto" (the EMA copy when the file has one), "ema" or "weights"."""

    SPEC_HINT: ClassVar[str] = f"{{path: <file>, which: {' | '.join(WHICH)}}}"

    path: str
    which: str = "auto"

    def __post_init__(self):
        if self.which not in WHICH:
            raise ValueError(
                f"which must be one of {', '.join(WHICH)}, got {self.which!r}{did_you_mean(str(self.which), list(WHICH))}"
            )


def plan_released_duo(p: Planner, name: str, m: MethodSpec) -> Stage:
    config = {"data": p.data, "checkpoint": dataclasses.asdict(m.settings), **DUO_PATH}
    return p.add(Stage("load_released_duo", config))


register_kind(
    MethodKind(
        "released_duo",
        DUO_SAMPLER,
        DUO_RULES,
        plan_released_duo,
        settings_key="checkpoint",
        settings_cls=ReleasedDuoCheckpoint,
        settings_required=True,
    )
)


@stage_kind(
    "load_released_duo",
    resources="gpu",
    version="1",
    sources=(
        "fsdfm.methods.released_duo:load_released_duo",
        "fsdfm.methods.released:write_pointer",
        "fsdfm.released_checkpoints",
        "fsdfm.released_mdlm",
        *DATA_SOURCES,
    ),
    model_sampler=DUO_SAMPLER,
    model_rule="ancestral",
)
def load_released_duo(config: dict, inputs: dict, out_dir: Path) -> dict:
    """A released Duo / DCD checkpoint as the model of a method: load and check it once, write a pointer to it."""
    corpus = corpus_for(config, out_dir)
    ckpt = {**config["checkpoint"], "family": "usdm"}
    file = Path(ckpt["path"]).resolve()
    loaded = load_mdlm_family(file, "usdm", ckpt["which"], vocab_size=corpus.vocab_size)
    return write_pointer({**config, "checkpoint": ckpt}, out_dir, corpus, file, loaded)
