"""Stage "exact_law": a few-step sampler's exact output law on an enumerable oracle source, and the chain-rule split
of its trajectory KL (issue 26: divergences, not only a cross-entropy).

oracle_nll - H_L is a cross-entropy excess, KL(q || p) / L + (H(q) - H(p)) / L: a more diffuse sampler scores
worse at equal KL, a sharper one better. Where the state space is small (A^L states, A = V + 1 under the mask
source, V under the uniform source; `ExactLawSpec.max_states`) this stage computes the output law q of the run's
sampler exactly (`fsdfm.oracle_law.output_law`: the same model, rule, time grid and t_end as its sample stage) and
records, per token,

    law_kl_qp = KL(q || p) / L,   law_kl_pq = KL(p || q) / L,   law_entropy_gap = (H(q) - H(p)) / L,
    law_ce_excess = E_q[-log p] / L - H(p) / L = law_kl_qp + law_entropy_gap  (what oracle_nll - H_L estimates).

For budgets up to `split_max_steps` it also records the per-step chain-rule split along the true path
(`fsdfm.oracle_law.step_split`), summed over the grid's steps and averaged over `split_states` states x_t ~ p_t
per step (drawn from the source and noised by the path):

    split_path_kl = sum_steps E_{x_t} KL(J || prod_i Q_i) / L = split_factorization + split_per_position,
    split_factorization = sum_steps E TC(J) / L        (what no product sampler removes on this grid),
    split_per_position = sum_steps E sum_i KL(J_i || Q_i) / L   (the rule's discretization and the model's error),

the KL between the exact and the sampler's trajectory laws when x_t follows the path (under the mask source the
exact process's marginals are the path's), an upper bound on KL(p || q) of the outputs by data processing. The
split needs the grid to end at t = 1 (a generalized-KL teacher's grid ends at 1 - eps: no split, said in the record).

Planned (`plan_exact_law`, a registered diagnostic) for every (rule, budget <= max_steps) of a method whose sampler
is the product kernel the dense pass models: the mixture-path DiT sampler ("dfm": DFM, FS-DFM, SDTT) and the exact
denoiser ("exact"), without sampler knobs (a knob changes the kernel). Boundary: reads a model and an oracle source;
knows nothing of samples, metrics' tables or the records' layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.data import DataConfig, oracle_source
from fsdfm.data.oracle import ORACLE_SOURCES
from fsdfm.methods.base import DIAGNOSTICS, METHOD_KINDS, Planner, path_source
from fsdfm.methods.common import DATA_SOURCES, load_dit
from fsdfm.methods.exact_teacher import load_exact
from fsdfm.metrics.law import LAW_METRICS
from fsdfm.oracle_law import divergences, output_law, step_split
from fsdfm.paths import MixturePath
from fsdfm.samplers import get_rule, time_grid
from fsdfm.study.graph import PlanError, Stage, stage_kind
from fsdfm.study.spec import MethodSpec

LAW_KIND = "exact_law"  # the `kind` of its runs (the report keeps them out of the sample-quality tables)
SPLIT_SEED = 7919  # the states x_t of the split: a seed of their own, apart from the sampling seed


@dataclass(frozen=True)
class LawModel:
    """What the dense pass needs of a model: model(x_t, t, h) -> logits (B, L, V), its path, h conditioning."""

    model: Callable
    path: MixturePath
    h_conditioned: bool


def _dit(model_dir: Path, data_cfg: dict) -> LawModel:
    m = load_dit(model_dir, torch.device("cpu"))
    return LawModel(m.model.eval(), m.path, m.h_conditioned)


def _exact(model_dir: Path, data_cfg: dict) -> LawModel:
    exact = load_exact(model_dir, data_cfg)
    return LawModel(exact, exact.path, False)


# sampler name -> its model loader: the samplers whose step is `fsdfm.oracle_law.product_kernel` with no knob set
LAW_MODELS: dict[str, Callable[[Path, dict], LawModel]] = {"dfm": _dit, "exact": _exact}


def state_count(vocab_size: int, seq_len: int, source: str) -> int:
    """A^L: the states the dense pass enumerates (the mask id is one more symbol under the mask source)."""
    return (vocab_size + (source == "mask")) ** seq_len


@DIAGNOSTICS.register("exact_law")
def plan_exact_law(p: Planner, model: Stage, mname: str, m: MethodSpec, add_run: Callable) -> None:
    """One exact_law stage (a run of kind LAW_KIND) per (rule, budget <= max_steps) of a method the pass models."""
    law = p.spec.metrics.exact_law
    kind = METHOD_KINDS.get(m.kind)
    if law is None or kind.sampler not in LAW_MODELS or m.knobs:
        return
    data = p.spec.data
    if data.kind != "oracle":
        raise PlanError(f"metrics.exact_law: needs an oracle source (data.kind: oracle), got data.kind {data.kind!r}")
    # the path the method samples: a student's is its teacher's, whatever its own `source` field says
    source = path_source(p.spec.methods, m)
    n = state_count(oracle_source(data).vocab_size, int(data.seq_len), source)
    if n > law.max_states:  # PlanError: the CLI's one-line message, before anything is written
        raise PlanError(
            f"metrics.exact_law: method {mname!r} has {n:,} states (A^L, source {source!r}), over max_states "
            f"{law.max_states:,}; use a smaller vocab_size or seq_len, or raise max_states (<= 1,000,000)"
        )
    if p.spec.sampling.forward_precision != "float32":
        raise PlanError(
            f"metrics.exact_law: the law is of the float32 forward pass; sampling.forward_precision is "
            f"{p.spec.sampling.forward_precision!r} (its samples would come from another one): drop one of the two"
        )
    t_end = 1.0 - p.spec.sampling.eps if kind.ends_before_one(m) else 1.0
    # a whole-step sampler (confidence order, threshold, ReMDM: fsdfm.sampling) is no product kernel: no law run
    for rule in (r for r in (m.rules or kind.rules[:1]) if not hasattr(get_rule(r), "sample_loop")):
        for steps in (s for s in m.budgets if s <= law.max_steps):
            cfg = {"data": p.data, "sampler": kind.sampler, "rule": rule, "steps": steps, "t_end": t_end}
            cfg |= {"split_max_steps": law.split_max_steps, "split_states": law.split_states}  # what the stage reads
            stage = p.add(Stage("exact_law", cfg, {"model": model.id}))
            add_run({"method": mname, "kind": LAW_KIND, "label": m.label or mname, "rule": rule, "steps": steps}, stage)


@stage_kind(
    "exact_law",
    resources="cpu",
    version="2",  # 2: the split's standard error over the rows' totals (1 summed per-step variances)
    metrics=tuple(name for name, *_ in LAW_METRICS),  # registered, with their descriptions, in fsdfm.metrics.law
    sources=(
        "fsdfm.methods.exact_law",
        "fsdfm.oracle_law",
        "fsdfm.oracle_posterior",
        "fsdfm.oracle_joint",
        "fsdfm.samplers",
        "fsdfm.methods.common:load_dit",
        "fsdfm.methods.exact_teacher",
        *ORACLE_SOURCES,
        *DATA_SOURCES,
    ),
)
def exact_law_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The exact output law's divergences (and, for small budgets, the trajectory split) of one sampler setting."""
    source = oracle_source(DataConfig(**config["data"]))
    net = LAW_MODELS[config["sampler"]](Path(inputs["model"]), config["data"])
    L = int(config["data"]["seq_len"])
    grid = time_grid(config["steps"], t_end=config["t_end"])
    with torch.no_grad():
        law = output_law(net.model, net.path, L, grid, config["rule"], net.h_conditioned)
    d = divergences(law, source)
    metrics = {
        "law_kl_qp": d.kl_qp,
        "law_kl_pq": d.kl_pq if math.isfinite(d.kl_pq) else None,
        "law_entropy_gap": d.entropy_q - d.entropy_p,
        "law_ce_excess": d.cross_entropy - d.entropy_p,
    }
    record = {"law": dataclasses.asdict(d), "law_mass": float(law.probs.sum()), "states": int(len(law.states))}
    if config["steps"] > config["split_max_steps"]:
        record["split"] = f"not computed: {config['steps']} steps > split_max_steps {config['split_max_steps']}"
    elif config["t_end"] < 1.0:
        record["split"] = f"not computed: the grid ends at t = {config['t_end']} < 1 (the exact step law ends at 1)"
    else:
        split = trajectory_split(net, source, grid, config["rule"], config["split_states"], L)
        metrics |= {k: split[k] for k in ("split_path_kl", "split_factorization", "split_per_position")}
        record["split"] = split
    return {"metrics": metrics, **record}


def trajectory_split(net: LawModel, source, grid: torch.Tensor, rule: str, n_states: int, L: int) -> dict:
    """Per token, summed over the grid's steps: E_{x_t ~ p_t} of step_split's terms, with each sum's Monte-Carlo
    standard error. Row j of the sample is one x_1 (drawn once) noised afresh at every step's t, so the rows are
    i.i.d. but a row's steps are not independent of each other: the SE is that of the rows' totals over the steps,
    std(totals) / sqrt(n_states), not a sum of per-step variances.

    Returns {split_path_kl, split_factorization, split_per_position, *_se, per_step: [{t, h, path_kl, tc}]}."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    x_1 = torch.from_numpy(np.asarray(source.sample(n_states, L, seed=SPLIT_SEED), dtype=np.int64))
    totals = {k: np.zeros(n_states) for k in ("path_kl", "tc", "per_position")}  # per row, summed over steps
    per_step = []
    for i in range(grid.numel() - 1):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        x_t = net.path.sample(x_1, torch.full((n_states,), t), gen).x_t
        with torch.no_grad():
            parts = [step_split(net.model, source, net.path, x, t, h, rule, net.h_conditioned) for x in x_t]
        values = {
            "path_kl": np.array([s.path_kl for s in parts]),
            "tc": np.array([s.tc for s in parts]),
            "per_position": np.array([float(s.per_position.sum()) for s in parts]),
        }
        for k, v in values.items():
            totals[k] += v / L
        per_step.append({"t": t, "h": h, "path_kl": float(values["path_kl"].mean()), "tc": float(values["tc"].mean())})
    out = {}
    for name, k in (
        ("split_path_kl", "path_kl"),
        ("split_factorization", "tc"),
        ("split_per_position", "per_position"),
    ):
        out[name] = float(totals[k].mean())
        out[name + "_se"] = float(totals[k].std(ddof=1) / math.sqrt(n_states))  # n_states >= 2 (ExactLawSpec)
    return out | {"n_states": n_states, "per_step": per_step}
