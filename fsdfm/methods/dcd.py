"""Kind "dcd": discrete consistency distillation (Sahoo et al. 2025) of a Duo teacher (kind "duo").

Registers on itself: its settings (`distill:` builds `DCDSettings`: rounds, base_steps, loss), its planning (the
Duo teacher's stage, then distil_dcd) and the stage `distil_dcd`: round r trains the student at gap
h = 2^r / base_steps on pairs (x_t, x_{t+h}) of one Gaussian DDIM trajectory (fsdfm.duo.DCDObjective), then the
raw student becomes the teacher (the authors' teacher_ema False). Sampled by Duo's sampler ("duo": ancestral or
greedy_tail), which counts its NFE.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fsdfm.duo import DCDObjective
from fsdfm.methods.base import MethodKind, Planner, register_kind
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
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.train import OptimConfig


@dataclass(frozen=True)
class DCDSettings:
    """rounds (CPU default 3; authors: until 2^n / 64 reaches the target step), base_steps (authors' T = 64) and
    loss ("kl_bwd", authors' default, or "kl")."""

    SPEC_HINT = "distill: {rounds, base_steps, loss}"
    rounds: int = 3
    base_steps: int = 64
    loss: str = "kl_bwd"

    def __post_init__(self):
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if not (isinstance(self.base_steps, int) and self.base_steps >= 2 ** (self.rounds - 1)):
            raise ValueError(f"base_steps must be an integer >= 2^(rounds - 1), got {self.base_steps!r}")
        if self.loss not in ("kl", "kl_bwd"):
            raise ValueError(f"loss must be kl or kl_bwd, got {self.loss!r}")

    def gap(self, r: int) -> float:
        return 2.0**r / self.base_steps


def plan_dcd(p: Planner, name: str, m: MethodSpec) -> Stage:
    teacher = p.model_stage(m.teacher)
    config = {"data": p.data, "distill": dataclasses.asdict(m.settings), "optim": p.optim(m)}
    return p.add(Stage("distil_dcd", config, {"teacher": teacher.id}))


register_kind(
    MethodKind(
        "dcd",
        "duo",
        ("ancestral", "greedy_tail"),
        plan_dcd,
        teacher_kind="duo",
        settings_key="distill",
        settings_cls=DCDSettings,
    )
)


@stage_kind(
    "distil_dcd",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: oracle_model_metric(c),
    sources=(
        "fsdfm.methods.dcd:distil_dcd",
        "fsdfm.methods.rounds",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.duo",
        "fsdfm.methods.common:load_dit",
    ),
    model_sampler="duo",
    model_rule="ancestral",
)
def distil_dcd(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Every DCD round (fsdfm.methods.rounds): round r trains at gap h = 2^r / base_steps."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = DCDSettings(**config["distill"])
    optim = OptimConfig(**config["optim"])
    loaded = load_dit(inputs["teacher"])
    teacher = loaded.model.requires_grad_(False)
    res = fit_rounds(
        copy.deepcopy(teacher).requires_grad_(True).train(),
        teacher,
        cfg.rounds,
        lambda r, t: DCDObjective(t, loaded.path, cfg.gap(r), cfg.loss),
        corpus,
        optim,
        out_dir,
        lambda r: f"dcd round {r + 1}/{cfg.rounds}: gap {cfg.gap(r):g}",
    )
    save_dit(out_dir, res.model, loaded.path_cfg, h_conditioned=False, corpus=corpus)
    return {
        "metrics": {
            **rounds_metrics(res, optim, corpus.seq_len, cfg.rounds, DCDObjective.TEACHER_NFE),
            **oracle_model_metrics(config, res.model, loaded.path, corpus),
        },
        "gaps": [cfg.gap(r) for r in range(cfg.rounds)],
        "loss_curve": loss_curve(res.losses),
        "resumed_from": res.resumed_from,
    }
