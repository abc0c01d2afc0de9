"""Kind "fmlm": the two-time flow-map denoiser distilled from a frozen FLM teacher (fsdfm.fmlm).

Registers on itself: its settings (`distill:` builds `FMLMConfig`), its planning (the teacher's stage, then
distil_fmlm), the stage `distil_fmlm` and the sampler "fmlm".
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsdfm.fmlm import FMLMConfig, FMLMObjective, fmlm_student
from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    SAMPLERS,
    corpus_for,
    fit_dit,
    join_process_group,
    load_dit,
    train_metrics,
)
from fsdfm.methods.flm import continuous_sampler
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.flm import FLMTime


def plan_fmlm(p: Planner, name: str, m: MethodSpec) -> Stage:
    teacher = p.model_stage(m.teacher)
    return p.add(
        Stage("distil_fmlm", {"data": p.data, "fmlm": dict(m.distill), "optim": p.optim(m)}, {"teacher": teacher.id})
    )


register_kind(
    MethodKind(
        "fmlm", "fmlm", ("flow_map",), plan_fmlm, teacher_kind="flm", settings_key="distill", settings_cls=FMLMConfig
    )
)


@stage_kind(
    "distil_fmlm",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    sources=(
        "fsdfm.methods.fmlm:distil_fmlm",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.flm",
        "fsdfm.fmlm",
        "fsdfm.methods.common:load_dit",
    ),
    model_sampler="fmlm",
    model_rule="flow_map",
)
def distil_fmlm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """FMLM: the two-time flow-map denoiser distilled from a frozen FLM teacher by the semigroup rule."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    teacher = load_dit(inputs["teacher"])
    torch.manual_seed(config["optim"]["seed"])
    student = fmlm_student(teacher.model)
    obj = FMLMObjective(teacher.model.requires_grad_(False), FLMTime(corpus.vocab_size), FMLMConfig(**config["fmlm"]))
    res, _ = fit_dit(student, obj, corpus, config, out_dir, "distil fmlm", {"continuous": "fmlm"}, h_conditioned=True)
    return train_metrics(res, {"n_params": student.num_parameters()})


SAMPLERS.register("fmlm", continuous_sampler(two_time=True))
