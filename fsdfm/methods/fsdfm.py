"""Kind "fsdfm": the few-step FS-DFM student (Monsefi et al. 2025), distilled from a DFM teacher (or from the
exact posterior of an oracle source) by the shortcut objective of fsdfm.objectives.

Registers on itself: its settings (`distill:` builds `FSDFMSettings`, once, at spec load), its planning (the
teacher's stage, then distil_fsdfm), its check of `teacher: exact`, and the stage `distil_fsdfm`. It is
sampled by the DFM sampler ("dfm", fsdfm.methods.dfm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdfm.methods.base import EXACT_TEACHER, MethodKind, Planner, declared_rules, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    build_model_config,
    corpus_for,
    fit_dit,
    join_process_group,
    load_dit,
    oracle_model_metric,
    oracle_curve_metrics,
    oracle_model_metrics,
    train_metrics,
)
from fsdfm.methods.exact import plan_exact
from fsdfm.model import DiT, student_from_teacher
from fsdfm.objectives import FROZEN_TEACHER_SHORTCUTS, SHORTCUTS, FSDFMConfig, FSDFMObjective
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec, SpecError, StudySpec
from fsdfm.methods.exact_teacher import exact_path_cfg, is_exact, load_exact


@dataclass(frozen=True)
class FSDFMSettings(FSDFMConfig):
    """FS-DFM distillation settings (the `distill:` section): every FSDFMConfig knob plus the step-size embedding."""

    h_embedding: str = "log2"

    def __post_init__(self):
        super().__post_init__()
        if self.h_embedding not in ("raw", "log2"):
            raise ValueError(f"h_embedding must be raw or log2, got {self.h_embedding!r}")

    def objective(self) -> FSDFMConfig:
        return FSDFMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FSDFMConfig)})


def plan_fsdfm(p: Planner, name: str, m: MethodSpec) -> Stage:
    config = {"data": p.data, "distill": dataclasses.asdict(m.settings), "optim": p.optim(m)}
    if m.teacher == EXACT_TEACHER:
        # no teacher weights: the student is a fresh DiT of its own model settings on its own path, and the exact
        # posterior is its frozen shortcut evaluator (the role of the frozen DFM teacher)
        teacher = plan_exact(p, name, m)
        config["model"] = p.model_cfg(m)
    else:
        teacher = p.model_stage(m.teacher)
    return p.add(Stage("distil_fsdfm", config, {"teacher": teacher.id}))


def check_exact_teacher(spec: StudySpec, name: str, m: MethodSpec, file: str) -> None:
    """With `teacher: exact` the exact posterior is the frozen teacher: the shortcut must use one."""
    shortcut = m.distill.get("shortcut", FSDFMConfig.shortcut)
    if shortcut not in SHORTCUTS or not SHORTCUTS.get(shortcut).uses_frozen_teacher:
        raise SpecError(
            f"{file}: methods.{name}.distill.shortcut: with teacher {EXACT_TEACHER!r} the exact posterior "
            f"is the frozen teacher: set shortcut to one of {', '.join(FROZEN_TEACHER_SHORTCUTS)}"
        )


register_kind(
    MethodKind(
        "fsdfm",
        "dfm",
        declared_rules("fsdfm", "cumulative_scalar"),
        plan_fsdfm,
        teacher_kind="dfm",
        settings_key="distill",
        settings_cls=FSDFMSettings,
        exact_teacher=True,
        validate=check_exact_teacher,
        pos_divergence=True,
        # posterior_kl at every step size the student learns (oracle data only; fsdfm_train's curve)
        curve_metrics=lambda spec, m: (
            tuple(f"posterior_kl_h{2.0**-j:g}" for j in range(m.settings.K + 1)) if spec.data.kind == "oracle" else ()
        ),
    )
)


@stage_kind(
    "distil_fsdfm",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: oracle_model_metric(c),
    sources=(
        "fsdfm.methods.fsdfm:distil_fsdfm",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.objectives",
        "fsdfm.losses",
        "fsdfm.methods.common:load_dit",
        "fsdfm.methods.fsdfm:FSDFMSettings",
        "fsdfm.teachers",
        "fsdfm.methods.exact_teacher",
        "fsdfm.oracle_posterior",
    ),
    model_sampler="dfm",
    model_rule="cumulative_scalar",
)
def distil_fsdfm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The FS-DFM student, initialised from the teacher with a fresh step-size embedding."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    settings = FSDFMSettings(**config["distill"])
    if is_exact(inputs["teacher"]):  # teacher: exact -- fresh student, exact posterior as frozen evaluator
        exact = load_exact(inputs["teacher"], config["data"])
        path_cfg, teacher_path = exact_path_cfg(inputs["teacher"]), exact.path
        torch.manual_seed(config["optim"]["seed"])
        student = DiT(
            build_model_config(
                config["model"],
                corpus.vocab_size,
                corpus.seq_len,
                h_embedding=settings.h_embedding,
                input_vocab_size=teacher_path.source.input_vocab_size,
            )
        )
        frozen = exact
    else:
        teacher = load_dit(inputs["teacher"])
        path_cfg, teacher_path = teacher.path_cfg, teacher.path
        torch.manual_seed(config["optim"]["seed"])
        student = student_from_teacher(teacher.model, settings.h_embedding)
        frozen = teacher.model.requires_grad_(False) if settings.shortcut_entry.uses_frozen_teacher else None
    # the curve (oracle data): posterior_kl at every step size h = 2^-j the student is trained and sampled at
    kl = oracle_curve_metrics(config, teacher_path, corpus, hs=tuple(2.0**-j for j in range(settings.K + 1)))
    res, final = fit_dit(
        student,
        FSDFMObjective(teacher_path, settings.objective(), frozen),
        corpus,
        config,
        out_dir,
        "distil fs-dfm student",
        path_cfg,
        h_conditioned=True,
        evaluate=(lambda m: {k: f(m) for k, f in kl.items()}) if kl else None,
    )
    return train_metrics(
        res,
        {
            "n_params": student.num_parameters(),
            **oracle_model_metrics(config, final, teacher_path, corpus, h=2.0**-settings.K),
        },
    )
