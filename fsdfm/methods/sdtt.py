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
import time
from pathlib import Path

from fsdfm.methods.base import MethodKind, Planner, declared_rules, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    corpus_for,
    device,
    join_process_group,
    load_dit,
    loss_curve,
    oracle_model_metric,
    oracle_model_metrics,
    save_dit,
)
from fsdfm.sdtt import SDTTConfig, SDTTObjective
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec, SpecError
from fsdfm.train import OptimConfig, fit


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


def training_compute(optim: dict, seq_len: int, rounds: int, teacher_nfe: int) -> dict:
    """Training compute of a distillation stage: optimiser steps, tokens (steps x batch x L) and the frozen
    networks' forwards per training row, so that tables compare methods at matched compute."""
    steps = rounds * int(optim["steps"])
    return {
        "train_steps": steps,
        "train_tokens": steps * int(optim["batch_size"]) * seq_len,
        "train_teacher_nfe_per_row": teacher_nfe,
    }


@stage_kind(
    "distil_sdtt",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: oracle_model_metric(c),
    sources=(
        "fsdfm.methods.sdtt:distil_sdtt",
        "fsdfm.methods.sdtt:training_compute",
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
    """Every SDTT round: round r distils teacher steps h = 1 / (base_steps / 2^r) into student steps 2h; the raw
    student weights are the next round's teacher (the authors' use_ema_on_growth False); the last round's EMA
    (when on) is the model. Each round resumes from its own checkpoint folder."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = SDTTConfig(**config["distill"])
    optim = OptimConfig(**config["optim"])
    loaded = load_dit(inputs["teacher"])
    teacher = loaded.model.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    losses, wall, resumed, rounds = [], 0.0, 0, []
    t0 = time.perf_counter()
    for r in range(cfg.rounds):
        h = 1.0 / cfg.teacher_steps(r)
        res = fit(
            student,
            SDTTObjective(teacher, loaded.path, cfg, h),
            corpus.train,
            optim,
            Path(out_dir) / "ckpt" / f"round_{r}",
            desc=f"sdtt round {r + 1}/{cfg.rounds}: {cfg.teacher_steps(r)} -> {cfg.teacher_steps(r) // 2} steps",
            device=device(),
        )
        losses += res.losses
        resumed = max(resumed, res.resumed_from)
        rounds.append({"teacher_steps": cfg.teacher_steps(r), "student_steps": cfg.teacher_steps(r) // 2})
        teacher = copy.deepcopy(res.model).requires_grad_(False).eval()
        final = res.ema if res.ema is not None else res.model
        student = res.model
    wall = time.perf_counter() - t0
    save_dit(out_dir, final, loaded.path_cfg, h_conditioned=False, corpus=corpus)
    return {
        "metrics": {
            "train_loss_final": float(sum(losses[-20:]) / len(losses[-20:])),
            "train_wall_s": wall,
            "rounds": cfg.rounds,
            "steps_per_round": optim.steps,
            "student_steps": cfg.student_steps,
            **training_compute(config["optim"], corpus.seq_len, cfg.rounds, SDTTObjective.TEACHER_NFE),
            "n_params": final.num_parameters(),
            **oracle_model_metrics(config, final, loaded.path, corpus),
        },
        "rounds": rounds,
        "loss_curve": loss_curve(losses),
        "resumed_from": resumed,
    }
