"""Kind "di4c": the Di4C mixture student (Hayakawa et al. 2024; the maths is fsdfm.di4c) of a mask-source DFM
teacher, on SDTT's rounds of x2 step reduction.

Registers on itself: its settings (`distill:` builds `Di4CSettings`: SDTT's rounds/base_steps/target plus
components, lambda_samples and the loss weights), its planning (the teacher's stage, then distil_di4c), the stage
`distil_di4c` and the sampler "di4c": the DFM sampling loop (fsdfm.samplers.sample, any mixture-path rule) with
lambda drawn once per step per sequence; NFE counts every lambda forward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fsdfm.di4c import Di4CConfig, Di4CObjective, LambdaModel
from fsdfm.io import atomic_write
from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    SAMPLERS,
    Draw,
    RowCounter,
    corpus_for,
    device,
    forward_autocast,
    join_process_group,
    load_dit,
    loss_curve,
    save_dit,
)
from fsdfm.methods.rounds import fit_rounds, frozen_copy, rounds_metrics
from fsdfm.model import student_from_teacher
from fsdfm.samplers import sample, time_grid
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec, SpecError
from fsdfm.train import OptimConfig

MIXTURE_FILE = "di4c.json"


class Di4CSettings(Di4CConfig):
    SPEC_HINT = "distill: {rounds, base_steps, target, components, lambda_samples, distill_weight, consistency_weight}"


def plan_di4c(p: Planner, name: str, m: MethodSpec) -> Stage:
    if p.spec.methods[m.teacher].source != "mask":
        raise SpecError(f"methods.{name}.teacher: Di4C distils a mask-source teacher; {m.teacher!r} is not one")
    teacher = p.model_stage(m.teacher)
    config = {"data": p.data, "distill": dataclasses.asdict(m.settings), "optim": p.optim(m)}
    return p.add(Stage("distil_di4c", config, {"teacher": teacher.id}))


register_kind(
    MethodKind(
        "di4c",
        "di4c",
        # the per-position rules of the DFM loop, which `LambdaModel` plugs into; not the whole-step samplers
        # (fsdfm.sampling), which call the network their own way. A fixed tuple also refuses source/scheduler
        # keys: the student samples its teacher's path
        ("cumulative_scalar", "euler", "mixture_euler"),
        plan_di4c,
        teacher_kind="dfm",
        settings_key="distill",
        settings_cls=Di4CSettings,
    )
)


@stage_kind(
    "distil_di4c",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: (),  # no posterior_kl: the student's p_{1|t} depends on lambda
    sources=(
        "fsdfm.methods.di4c:distil_di4c",
        "fsdfm.methods.rounds",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.di4c",
        "fsdfm.sdtt",
        "fsdfm.samplers",
        "fsdfm.methods.common:load_dit",
    ),
    model_sampler="di4c",
    model_rule="cumulative_scalar",
)
def distil_di4c(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Every round (fsdfm.methods.rounds): teacher steps h = 1 / (base_steps / 2^r) distilled into mixture-student
    steps 2h; the next round's teacher is the raw student called with lambda drawn per row, as it samples."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = Di4CConfig(**config["distill"])
    optim = OptimConfig(**config["optim"])
    loaded = load_dit(inputs["teacher"])
    teacher = loaded.model.requires_grad_(False)
    torch.manual_seed(optim.seed)
    student = student_from_teacher(loaded.model, "raw").requires_grad_(True).train()  # lambda rides the h input

    def next_teacher(model, r: int) -> LambdaModel:
        gen = torch.Generator(device()).manual_seed(optim.seed + r)
        return LambdaModel(frozen_copy(model, r), cfg.components, gen)

    res = fit_rounds(
        student,
        teacher,
        cfg.rounds,
        lambda r, t: Di4CObjective(t, loaded.path, cfg, 1.0 / cfg.teacher_steps(r)),
        corpus,
        optim,
        out_dir,
        lambda r: f"di4c round {r + 1}/{cfg.rounds}",
        next_teacher,
    )
    save_dit(out_dir, res.model, loaded.path_cfg, h_conditioned=True, corpus=corpus)
    atomic_write(Path(out_dir) / MIXTURE_FILE, json.dumps({"components": cfg.components}).encode())
    return {
        "metrics": {
            **rounds_metrics(res, optim, corpus.seq_len, cfg.rounds, Di4CObjective.TEACHER_NFE),
            "student_steps": cfg.student_steps,
            "train_student_nfe_per_row": cfg.lambda_samples,
        },
        "rounds": [
            {"teacher_steps": cfg.teacher_steps(r), "student_steps": cfg.teacher_steps(r) // 2}
            for r in range(cfg.rounds)
        ],
        "loss_curve": loss_curve(res.losses),
        "resumed_from": res.resumed_from,
    }


@SAMPLERS.register("di4c")
def sample_di4c(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    m = load_dit(model_dir, dev)
    components = json.loads((Path(model_dir) / MIXTURE_FILE).read_text())["components"]
    net = RowCounter(m.model)
    precision = getattr(torch, cfg["precision"])

    def run(n, grid, gen):
        model = LambdaModel(net, components, gen)  # lambda from the sampler's own generator: one draw per step
        return sample(
            model,
            m.path,
            n_samples=n,
            seq_len=corpus.seq_len,
            grid=grid,
            rule=cfg["rule"],
            h_conditioned=False,
            generator=gen,
            precision=precision,
            batch_size=cfg["batch_size"],
            device=dev,
            autocast=forward_autocast(cfg),
        )

    run(min(cfg["batch_size"], cfg["n_samples"]), time_grid(1, t_end=cfg["t_end"]), torch.Generator(dev).manual_seed(0))
    net.reset()
    return Draw(lambda gen: run(cfg["n_samples"], time_grid(cfg["steps"], t_end=cfg["t_end"]), gen), net)
