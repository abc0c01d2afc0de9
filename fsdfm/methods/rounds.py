"""Rounds of step reduction, the training skeleton SDTT, Di4C and DCD share: round r fits the student to the
target its kind builds from the current teacher, then the raw student (not its EMA: the authors'
use_ema_on_growth / teacher_ema False) becomes the next round's teacher; the last round's EMA, when on, is the model.

Boundary: knows the train loop (fsdfm.train.fit) and the checkpoint folder of each round; knows no method's target
(each kind passes its objective) and writes no artefact.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

from torch import nn

from fsdfm.methods.common import device
from fsdfm.train import OptimConfig, fit


def frozen_copy(model: nn.Module, r: int) -> nn.Module:
    """The next round's teacher: a frozen copy of the raw student after round `r`."""
    return copy.deepcopy(model).requires_grad_(False).eval()


@dataclasses.dataclass(frozen=True)
class Rounds:
    """model: the last round's (its EMA when on); losses: every round's, concatenated; resumed_from: the most."""

    model: nn.Module
    losses: list[float]
    resumed_from: int
    wall_s: float


def fit_rounds(
    student: nn.Module,
    teacher: nn.Module,
    n_rounds: int,
    objective: Callable[[int, nn.Module], object],
    corpus,
    optim: OptimConfig,
    out_dir: Path,
    desc: Callable[[int], str],
    next_teacher: Callable[[nn.Module, int], nn.Module] = frozen_copy,
) -> Rounds:
    """`n_rounds` rounds of `optim.steps` steps on corpus.train; round r trains on objective(r, teacher), labelled
    desc(r), checkpoints to (and resumes from) out_dir/ckpt/round_<r>; next_teacher(raw student, r) is round r+1's."""
    losses: list[float] = []
    resumed, final = 0, student
    t0 = time.perf_counter()
    for r in range(n_rounds):
        res = fit(
            student,
            objective(r, teacher),
            corpus.train,
            optim,
            Path(out_dir) / "ckpt" / f"round_{r}",
            desc=desc(r),
            device=device(),
        )
        losses += res.losses
        resumed = max(resumed, res.resumed_from)
        teacher = next_teacher(res.model, r)
        final = res.ema if res.ema is not None else res.model
        student = res.model
    return Rounds(final, losses, resumed, time.perf_counter() - t0)


def rounds_metrics(res: Rounds, optim: OptimConfig, seq_len: int, n_rounds: int, teacher_nfe: int) -> dict:
    """The training metrics of a rounds stage: the final loss (mean of the last 20 steps), wall time, and its
    compute (optimiser steps, tokens = steps x batch x L, frozen-network forwards per training row), so that
    tables compare methods at matched compute."""
    steps = n_rounds * optim.steps
    return {
        "train_loss_final": float(sum(res.losses[-20:]) / len(res.losses[-20:])),
        "train_wall_s": res.wall_s,
        "rounds": n_rounds,
        "steps_per_round": optim.steps,
        "train_steps": steps,
        "train_tokens": steps * optim.batch_size * seq_len,
        "train_teacher_nfe_per_row": teacher_nfe,
        "n_params": res.model.num_parameters(),
    }
