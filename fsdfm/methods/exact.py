"""Kind "exact": the exact denoiser of an oracle source, sampled by the DFM sampling loop with every rule.

Nothing is trained: the stage `exact_posterior` records the path (fsdfm.methods.exact_teacher), and the sampler "exact"
samples `ExactPosterior` like a network. Kind "exact_joint" (rule "ffbs") shares that stage and draws x_1 jointly
(fsdfm.oracle_joint): no factorization error, so its oracle_nll is the source's H_L at every budget. `plan_exact` is also the planning of `teacher: exact` for the dfm and
fsdfm kinds. Oracle data only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fsdfm.methods.base import MethodKind, Planner, declared_rules, register_kind
from fsdfm.data.oracle import ORACLE_SOURCES
from fsdfm.methods.common import DATA_SOURCES, SAMPLERS, Draw, RowCounter
from fsdfm.samplers import sample, time_grid
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.data import DataConfig, oracle_source
from fsdfm.methods.exact_teacher import load_exact, write_exact
from fsdfm.oracle_joint import sample_joint


def plan_exact(p: Planner, name: str, m: MethodSpec) -> Stage:
    """The exact posterior of the oracle source on the method's path: no training, one small record."""
    return p.add(
        Stage("exact_posterior", {"data": p.data, "source": m.source, "scheduler": dataclasses.asdict(m.scheduler)})
    )


register_kind(MethodKind("exact", "exact", declared_rules("exact", "cumulative_scalar"), plan_exact, oracle_only=True))
# The exact joint sampler (fsdfm.oracle_joint): x_1 drawn jointly from p(x_1 | x_t) by FFBS at every step, then the
# path's bridge; an exact draw from the source at any budget (the zero-error floor). Its one "rule" names the draw.
register_kind(MethodKind("exact_joint", "exact_joint", ("ffbs",), plan_exact, oracle_only=True))


@stage_kind(
    "exact_posterior",
    resources="cpu",
    version="1",
    sources=(
        "fsdfm.methods.exact:exact_posterior_stage",
        "fsdfm.methods.exact_teacher",
        "fsdfm.oracle_posterior",
        *ORACLE_SOURCES,
        *DATA_SOURCES,
    ),
    model_sampler="exact",
    model_rule="cumulative_scalar",
)
def exact_posterior_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The exact denoiser of an oracle source (fsdfm.methods.exact_teacher): nothing to train; records its path."""
    oracle_source(DataConfig(**config["data"]))  # a bad oracle config fails here, with a clear DataError
    write_exact(Path(out_dir), {"source": config["source"], "scheduler": config["scheduler"]})
    return {"metrics": {}}


@SAMPLERS.register("exact")
def sample_exact(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    """The exact posterior sampled by the DFM sampling loop (same rules, grids and precision as a network)."""
    exact = load_exact(model_dir, cfg["data"])
    net = RowCounter(exact)
    grid = time_grid(cfg["steps"], t_end=cfg["t_end"])
    return Draw(
        lambda gen: sample(
            net,
            exact.path,
            n_samples=cfg["n_samples"],
            seq_len=corpus.seq_len,
            grid=grid,
            rule=cfg["rule"],
            generator=gen,
            precision=getattr(torch, cfg["precision"]),
            batch_size=cfg["batch_size"],
            device=dev,
        ),
        net,
    )


@SAMPLERS.register("exact_joint")
def sample_exact_joint(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    """The exact joint sampler (FFBS + bridge, fsdfm.oracle_joint) on the recorded path; it counts its own NFE
    (one joint posterior per step)."""
    exact = load_exact(model_dir, cfg["data"])
    grid = time_grid(cfg["steps"], t_end=cfg["t_end"])
    return Draw(
        lambda gen: sample_joint(
            exact.oracle,
            exact.path,
            n_samples=cfg["n_samples"],
            seq_len=corpus.seq_len,
            grid=grid,
            generator=gen,
            batch_size=cfg["batch_size"],
            device=dev,
        ),
        None,
    )
