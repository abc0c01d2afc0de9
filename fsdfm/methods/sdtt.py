"""Kind "sdtt": self-distillation through time (Deschenaux & Gulcehre 2024) from a mask-source DFM teacher.

Registers on itself: its settings (`distill:` builds `fsdfm.sdtt.SDTTConfig`: rounds, base_steps, target, loss),
its planning (the teacher's stage, then distil_sdtt), and the stage `distil_sdtt`, which runs every round (each
`train.steps` optimiser steps, two teacher forwards per training row) and records the round count, the sampling
steps of each round's student and the training compute. The student is a plain DiT on its teacher's path: it is
sampled by the DFM sampler ("dfm", fsdfm.methods.dfm), which counts its NFE. The maths is fsdfm.sdtt.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from fsdfm.methods.base import MethodKind, Planner, declared_rules, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    corpus_for,
    join_process_group,
    load_dit,
    loss_curve,
    oracle_model_metric,
    oracle_model_metrics,
    save_dit,
)
from fsdfm.methods.rounds import fit_rounds, rounds_metrics
from fsdfm.sdtt import SDTTConfig, SDTTObjective
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec, SpecError
from fsdfm.train import OptimConfig


class SDTTSettings(SDTTConfig):
    SPEC_HINT = "distill: {rounds, base_steps, target, loss}"


def plan_sdtt(p: Planner, name: str, m: MethodSpec) -> Stage:
    teacher_spec = p.spec.methods[m.teacher]
    if teacher_spec.source != "mask":  # the target is the mask-source two-step marginal (fsdfm.sdtt)
        raise SpecError(
            f"methods.{name}.teacher: SDTT distils a mask-source teacher; {m.teacher!r} has source "
            f"{teacher_spec.source!r}"
        )
    teacher = p.model_stage(m.teacher)
    config = {"data": p.data, "distill": dataclasses.asdict(m.settings), "optim": p.optim(m)}
    return p.add(Stage("distil_sdtt", config, {"teacher": teacher.id}))


register_kind(
    MethodKind(
        "sdtt",
        "dfm",
        declared_rules("sdtt", "cumulative_scalar"),
        plan_sdtt,
        teacher_kind="dfm",
        settings_key="distill",
        settings_cls=SDTTSettings,
        pos_divergence=True,
    )
)


@stage_kind(
    "distil_sdtt",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: oracle_model_metric(c),
    sources=(
        "fsdfm.methods.sdtt:distil_sdtt",
        "fsdfm.methods.rounds",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.sdtt",
        "fsdfm.samplers",
        "fsdfm.methods.common:load_dit",
    ),
    model_sampler="dfm",
    model_rule="cumulative_scalar",
)
def distil_sdtt(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Every SDTT round (fsdfm.methods.rounds): round r distils teacher steps h = 1 / (base_steps / 2^r) into
    student steps 2h."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = SDTTConfig(**config["distill"])
    optim = OptimConfig(**config["optim"])
    loaded = load_dit(inputs["teacher"])
    teacher = loaded.model.requires_grad_(False)
    res = fit_rounds(
        copy.deepcopy(teacher).requires_grad_(True).train(),
        teacher,
        cfg.rounds,
        lambda r, t: SDTTObjective(t, loaded.path, cfg, 1.0 / cfg.teacher_steps(r)),
        corpus,
        optim,
        out_dir,
        lambda r: f"sdtt round {r + 1}/{cfg.rounds}: {cfg.teacher_steps(r)} -> {cfg.teacher_steps(r) // 2} steps",
    )
    save_dit(out_dir, res.model, loaded.path_cfg, h_conditioned=False, corpus=corpus)
    return {
        "metrics": {
            **rounds_metrics(res, optim, corpus.seq_len, cfg.rounds, SDTTObjective.TEACHER_NFE),
            "student_steps": cfg.student_steps,
            **oracle_model_metrics(config, res.model, loaded.path, corpus),
        },
        "rounds": [
            {"teacher_steps": cfg.teacher_steps(r), "student_steps": cfg.teacher_steps(r) // 2}
            for r in range(cfg.rounds)
        ],
        "loss_curve": loss_curve(res.losses),
        "resumed_from": res.resumed_from,
    }
