"""The exact posterior as a method and as a teacher (`kind: exact`, `teacher: exact`; oracle data only).

* `kind: exact` -- the stage `exact_posterior` trains nothing; it records the path (source, scheduler) in
  `exact.json`, and the sampler "exact" samples `ExactPosterior` with the ordinary sampling loop (every rule, every
  budget), so oracle_nll(exact, N) is the sampler's own error at N: factorization plus discretization, no model error.
* `teacher: exact` for an FS-DFM student -- distillation measured apart from teacher quality: the exact posterior
  is the frozen shortcut evaluator (`shortcut: frozen_dfm`, the role of the frozen DFM teacher), and, there being no
  teacher weights to copy, the student starts from a freshly initialised DiT of its own model settings.
* `teacher: exact` for a DFM model -- the "exact targets" baseline: the data CE is replaced by
  KL(p_exact(. | x_t) || p_theta(. | x_t)) on the movable positions (`ExactTargetObjective`), the same minimiser with
  no label noise.

Boundary: the exact posterior's artefact (exact.json), objective and loader; method-side code used by the dfm,
fsdfm and exact kinds (fsdfm.methods), not by the library floor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import MixturePath
from fsdfm.io import atomic_write
from fsdfm.train import StepContext
from fsdfm.data import DataConfig, oracle_source
from fsdfm.methods.common import path_from_config

EXACT_FILE = "exact.json"


def is_exact(model_dir: Path) -> bool:
    """True when `model_dir` is the output of an exact_posterior stage."""
    return (Path(model_dir) / EXACT_FILE).is_file()


def write_exact(out_dir: Path, path_cfg: dict) -> None:
    """Record the path config {"source", "scheduler"} of an exact_posterior stage, atomically."""
    atomic_write(Path(out_dir) / EXACT_FILE, json.dumps({"path": path_cfg}, sort_keys=True).encode())


def load_exact(model_dir: Path, data_cfg: dict, dtype: torch.dtype = torch.float64) -> ExactPosterior:
    """The ExactPosterior of the study's oracle source (from the data config) on the recorded path."""
    path_cfg = json.loads((Path(model_dir) / EXACT_FILE).read_text())["path"]
    source = oracle_source(DataConfig(**data_cfg))
    return ExactPosterior(source, path_from_config(path_cfg, source.vocab_size), dtype)


def exact_path_cfg(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / EXACT_FILE).read_text())["path"]


class ExactTargetObjective:
    """DFM with exact targets: t ~ U[0, 1 - eps], x_t ~ p_t(. | x_1), loss = mean over movable positions of
    KL(p_exact(. | x_t) || softmax(f(x_t, t))) = sum_v p_exact(v) [log p_exact(v) - log p_theta(v)]."""

    def __init__(self, path: MixturePath, exact: ExactPosterior, eps: float):
        self.path, self.exact, self.eps = path, exact, eps

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        x_1 = ctx.batch
        t = torch.rand(x_1.shape[0], device=x_1.device, generator=ctx.generator) * (1.0 - self.eps)
        ps = self.path.sample(x_1, t, ctx.generator)
        with torch.no_grad():
            p = self.exact.probs(ps.x_t, t.double()).float()
        log_q = torch.log_softmax(ctx.model(ps.x_t, t).float(), -1)
        # p log p with 0 log 0 = 0; only -p log q carries the gradient
        kl = (torch.special.xlogy(p, p) - p * log_q).sum(-1)
        w = self.path.source.movable(ps.x_t).float()
        return (kl * w).sum() / w.sum().clamp_min(1.0)
