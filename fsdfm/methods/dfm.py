"""Kind "dfm": the discrete flow-matching teacher (Gat et al. 2024), mask or uniform source, CE or generalized-KL.

Registers on itself: its planning (one train_dfm stage; `teacher: exact` adds the exact posterior as its
target), the stage `train_dfm`, and the sampler "dfm" (the DFM sampling loop, fsdfm.samplers), which every
DFM-family kind (fsdfm, released) shares.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fsdfm.methods.base import EXACT_TEACHER, MethodKind, Planner, declared_rules, register_kind
from fsdfm.methods.exact import plan_exact
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    forward_autocast,
    SAMPLERS,
    Draw,
    RowCounter,
    build_model_config,
    corpus_for,
    fit_dit,
    join_process_group,
    load_dit,
    oracle_model_metric,
    oracle_curve_metrics,
    oracle_model_metrics,
    path_from_config,
    train_metrics,
)
from fsdfm.model import DiT
from fsdfm.objectives import DFMConfig, DFMObjective
from fsdfm.paths import MixturePath
from fsdfm.samplers import time_grid
from fsdfm.sampling import sample_with_knobs
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.methods.exact_teacher import ExactTargetObjective, load_exact

DFM_RULES = declared_rules("dfm", "euler")  # euler, cumulative_scalar, mixture_euler, mdlm


def plan_dfm(p: Planner, name: str, m: MethodSpec) -> Stage:
    # `teacher: exact`: the "exact targets" baseline, trained on KL(exact posterior || model) instead of CE on x_1
    inputs = {"teacher": plan_exact(p, name, m).id} if m.teacher == EXACT_TEACHER else {}
    return p.add(
        Stage(
            "train_dfm",
            {
                "data": p.data,
                "model": p.model_cfg(m),
                "source": m.source,
                "scheduler": dataclasses.asdict(m.scheduler),
                "objective": dataclasses.asdict(DFMConfig(m.loss, p.spec.sampling.eps)),
                "optim": p.optim(m),
            },
            inputs,
        )
    )


register_kind(
    MethodKind(
        "dfm",
        "dfm",
        DFM_RULES,
        plan_dfm,
        exact_teacher=True,
        pos_divergence=True,
        ends_before_one=lambda m: m.loss == "gkl",
        curve_metrics=lambda spec, m: (
            ("val_ce", *(("val_nll", "elbo_ppl") if m.source == "mask" else ()))
            + (("posterior_kl",) if spec.data.kind == "oracle" else ())
        ),
    )
)


@torch.no_grad()
def dfm_validation(
    model: DiT,
    path: MixturePath,
    valid: torch.Tensor,
    eps: float,
    seed: int = 0,
    n_batches: int = 8,
    batch_size: int = 32,
) -> dict:
    """Held-out CE on movable positions at t ~ U[0, 1 - eps] and, for the mask source, the ELBO bound
    val_nll = E_t[ g(t) sum_masked -log p(x_1 | x_t) ] / L (nats/token) and elbo_ppl = exp(val_nll)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    model.eval()
    ce_sum = ce_n = elbo = 0.0
    n_seq = 0
    dev = next(model.parameters()).device
    for b in range(n_batches):
        x_1 = valid[b * batch_size % max(1, len(valid)) :][:batch_size].to(dev)
        if len(x_1) == 0:
            break
        t = torch.rand(len(x_1), device=dev, generator=g) * (1 - eps)
        ps = path.sample(x_1, t, g)
        logp = torch.log_softmax(model(ps.x_t, t).float(), -1).gather(-1, x_1[..., None]).squeeze(-1)
        w = path.source.movable(ps.x_t).float()
        ce_sum += float((-logp * w).sum())
        ce_n += float(w.sum())
        elbo += float((path.scheduler(t).rate[:, None] * (-logp) * w).sum())
        n_seq += len(x_1)
    out = {"val_ce": ce_sum / max(ce_n, 1.0)}
    if path.source.name == "mask":
        out["val_nll"] = elbo / (n_seq * valid.shape[1])
        out["elbo_ppl"] = float(np.exp(out["val_nll"]))
    return out


def unigram_ce(train: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one-smoothed train unigram distribution on the valid tokens."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[valid.flatten()].mean())


@stage_kind(
    "train_dfm",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: (("val_nll", "elbo_ppl") if c.get("source") == "mask" else ()) + oracle_model_metric(c),
    sources=(
        "fsdfm.methods.dfm:train_dfm",
        *DIT_SOURCES,
        *DATA_SOURCES,
        "fsdfm.objectives",
        "fsdfm.losses",
        "fsdfm.methods.dfm:dfm_validation",
        "fsdfm.methods.dfm:unigram_ce",
        "fsdfm.methods.common:path_from_config",
    ),
    model_sampler="dfm",
    model_rule="cumulative_scalar",
)
def train_dfm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The DFM teacher: mask or uniform source, CE or generalized-KL loss."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    path = path_from_config(config, corpus.vocab_size)
    cfg = build_model_config(
        config["model"], corpus.vocab_size, corpus.seq_len, input_vocab_size=path.source.input_vocab_size
    )
    torch.manual_seed(config["optim"]["seed"])
    model = DiT(cfg)
    obj = DFMConfig(**config["objective"])
    objective = DFMObjective(path, obj)
    if "teacher" in inputs:  # teacher: exact -- the "exact targets" baseline (fsdfm.methods.exact_teacher)
        objective = ExactTargetObjective(path, load_exact(inputs["teacher"], config["data"]), obj.eps)
    kl = oracle_curve_metrics(config, path, corpus)

    def evaluate(m) -> dict:  # the curve: held-out CE / ELBO bound (2 batches) and posterior_kl on oracle data
        return {**dfm_validation(m, path, corpus.valid, obj.eps, n_batches=2), **{k: f(m) for k, f in kl.items()}}

    res, final = fit_dit(
        model,
        objective,
        corpus,
        config,
        out_dir,
        "train dfm teacher",
        {"source": config["source"], "scheduler": config["scheduler"]},
        h_conditioned=False,
        evaluate=evaluate,
    )
    val = dfm_validation(final, path, corpus.valid, obj.eps)
    return train_metrics(
        res,
        {
            **val,
            "unigram_ce": unigram_ce(corpus.train, corpus.valid, corpus.vocab_size),
            "n_params": model.num_parameters(),
            **oracle_model_metrics(config, final, path, corpus),
        },
    )


@SAMPLERS.register("dfm")
def sample_dfm(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    m = load_dit(model_dir, dev)
    net = RowCounter(m.model)
    grid = time_grid(cfg["steps"], t_end=cfg["t_end"])
    precision = getattr(torch, (cfg.get("knobs") or {}).get("precision") or cfg["precision"])

    def run(n, steps_grid, gen, knobs=cfg.get("knobs")):
        return sample_with_knobs(
            net,
            m.path,
            knobs=knobs,
            n_samples=n,
            seq_len=corpus.seq_len,
            grid=steps_grid,
            rule=cfg["rule"],
            h_conditioned=m.h_conditioned,
            generator=gen,
            precision=precision,
            batch_size=cfg["batch_size"],
            device=dev,
            autocast=forward_autocast(cfg),
        )

    warm = {k: v for k, v in (cfg.get("knobs") or {}).items() if k != "block_length"}  # 1 step covers one block
    run(
        min(cfg["batch_size"], cfg["n_samples"]),
        time_grid(1, t_end=cfg["t_end"]),
        torch.Generator(dev).manual_seed(0),
        warm,
    )  # warm-up
    net.reset()
    return Draw(lambda gen: run(cfg["n_samples"], grid, gen), net)
