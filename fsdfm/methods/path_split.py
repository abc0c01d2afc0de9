"""Stage "path_split": the per-step chain-rule split of a few-step sampler's trajectory KL at the study's own scale
(issue 26, item 4b: the mask source, any sequence length the exact posterior handles).

Along the true path, one step of a product sampler Q = prod_i Q_i against the exact step J splits exactly as
KL(J || prod_i Q_i) = TC(J) + sum_i KL(J_i || Q_i) (`fsdfm.oracle_law`). Under the mask source J has a closed form
(`fsdfm.oracle_split`), so where the exact_law stage must enumerate A^L states this one runs at L = 64 and beyond.
Per token, summed over the grid's steps, averaged over `states` rows x_1 ~ source, each noised afresh to every
step's t by the path:

    traj_kl = sum_steps E_{x_t ~ p_t} KL(J || prod_i Q_i) / L = traj_factorization + traj_per_position,
    traj_factorization = sum_steps E TC(J) / L        (no product sampler removes it on this grid),
    traj_per_position = sum_steps E sum_i KL(J_i || Q_i) / L   (the update rule's discretization and the model),

with each one's Monte-Carlo standard error over the rows' totals (a row's steps share its x_1; the total
correlation's own draws are inside each row's total). It is the KL between the exact process's and the sampler's
trajectory laws (an upper bound on KL(p || q) of the outputs), the divergence behind the CE excess the samples show.

Planned (`plan_path_split`, a registered diagnostic) for every (rule, budget <= max_steps) of a mask-source method
whose sampler is the product kernel (the DiT sampler "dfm": DFM, FS-DFM, SDTT; the exact denoiser "exact"), without
sampler knobs, whose grid ends at t = 1 (a generalized-KL teacher's ends before: no run). Boundary: reads a model and
an oracle source; knows nothing of samples, metrics' tables or the records' layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.data import DataConfig, oracle_source
from fsdfm.data.oracle import ORACLE_SOURCES
from fsdfm.methods.base import DIAGNOSTICS, METHOD_KINDS, Planner, path_source
from fsdfm.methods.common import DATA_SOURCES
from fsdfm.methods.exact_law import LAW_MODELS
from fsdfm.metrics.law import PATH_SPLIT_METRICS
from fsdfm.oracle_split import mask_step_split
from fsdfm.samplers import get_rule, time_grid
from fsdfm.study.graph import PlanError, Stage, stage_kind
from fsdfm.study.spec import MethodSpec

SPLIT_KIND = "path_split"  # the `kind` of its runs (the report keeps them out of the sample-quality tables)
SPLIT_SEED = 7919  # the rows x_1 and the draws: a seed of their own, apart from the sampling seed


@DIAGNOSTICS.register("path_split")
def plan_path_split(p: Planner, model: Stage, mname: str, m: MethodSpec, add_run: Callable) -> None:
    """One path_split stage (a run of kind SPLIT_KIND) per (rule, budget <= max_steps) of a mask-source method whose
    sampler is the product kernel (module docstring)."""
    spec = p.spec.metrics.path_split
    kind = METHOD_KINDS.get(m.kind)
    if spec is None or kind.sampler not in LAW_MODELS or m.knobs or kind.ends_before_one(m):
        return
    if path_source(p.spec.methods, m) != "mask":
        return
    if p.spec.data.kind != "oracle":
        raise PlanError(f"metrics.path_split: needs an oracle source (data.kind: oracle), got {p.spec.data.kind!r}")
    # a whole-step sampler (confidence order, threshold, ReMDM: fsdfm.sampling) is no product kernel: no split run
    for rule in (r for r in (m.rules or kind.rules[:1]) if not hasattr(get_rule(r), "sample_loop")):
        for steps in (s for s in m.budgets if s <= spec.max_steps and (not spec.budgets or s in spec.budgets)):
            cfg = {"data": p.data, "sampler": kind.sampler, "rule": rule, "steps": steps}
            cfg |= {"states": spec.states, "draws": spec.draws}
            stage = p.add(Stage("path_split", cfg, {"model": model.id}))
            add_run(
                {"method": mname, "kind": SPLIT_KIND, "label": m.label or mname, "rule": rule, "steps": steps}, stage
            )


@stage_kind(
    "path_split",
    resources="cpu",
    metrics=tuple(name for name, *_ in PATH_SPLIT_METRICS),  # registered, with their descriptions, in fsdfm.metrics.law
    sources=(
        "fsdfm.methods.path_split",
        "fsdfm.oracle_split",
        "fsdfm.oracle_law:product_kernel",
        "fsdfm.oracle_posterior",
        "fsdfm.oracle_joint",
        "fsdfm.samplers",
        "fsdfm.methods.common:load_dit",
        "fsdfm.methods.exact_teacher",
        *ORACLE_SOURCES,
        *DATA_SOURCES,
    ),
)
def path_split_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The trajectory KL of one sampler setting along the true path, split into factorization and per-position."""
    source = oracle_source(DataConfig(**config["data"]))
    net = LAW_MODELS[config["sampler"]](Path(inputs["model"]), config["data"])
    L = int(config["data"]["seq_len"])
    n, gen = int(config["states"]), torch.Generator().manual_seed(SPLIT_SEED)
    x_1 = torch.from_numpy(np.asarray(source.sample(n, L, seed=SPLIT_SEED), dtype=np.int64))
    grid = time_grid(config["steps"])
    totals = {k: torch.zeros(n, dtype=torch.float64) for k in ("path_kl", "tc", "per_position")}  # per row, per token
    per_step = []
    for i in range(grid.numel() - 1):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        x_t = net.path.sample(x_1, torch.full((n,), t), gen).x_t
        s = mask_step_split(net.model, source, net.path, x_t, t, h, config["rule"], net.h_conditioned,
                            int(config["draws"]), gen)  # fmt: skip
        for k in totals:
            totals[k] += getattr(s, k) / L
        per_step.append({"t": t, "h": h, "path_kl": float(s.path_kl.mean()) / L, "tc": float(s.tc.mean()) / L,
                         "tc_draw_se": float(s.tc_se.mean()) / L})  # fmt: skip
    metrics, record = {}, {"states": n, "draws": int(config["draws"]), "per_step": per_step}
    for name, k in (("traj_kl", "path_kl"), ("traj_factorization", "tc"), ("traj_per_position", "per_position")):
        v = totals[k]
        finite = bool(torch.isfinite(v).all())  # a model that puts no mass where the exact step goes: KL = inf
        metrics[name] = float(v.mean()) if finite else None
        record[name + "_se"] = float(v.std(unbiased=True) / math.sqrt(n)) if finite else None
    return {"metrics": metrics, **record}
