"""Kind "duo": uniform-state diffusion trained with the Gaussian-duality curriculum (Sahoo et al. 2025; the maths is
fsdfm.duo), and the sampler "duo" that it and DCD students share.

Registers on itself: its settings (`distill:` builds `DuoSettings`: the curriculum's start/end fractions and
temperatures), its planning (one train_duo stage), the stage `train_duo` and the sampler "duo" with two rules:
"ancestral" (the authors' plug-in posterior at every step) and "greedy_tail" (the same, the last step taking the
argmax of the denoiser; kept local to this kind: it is the authors' noise_removal=greedy without its extra forward).
Kind "exact_duo" (oracle data only) is the exact denoiser of the source on Duo's path, sampled by this sampler: its
oracle_nll at N is the ancestral (or greedy-tail) sampler's own error at N, the reference of the oracle
decomposition for Duo and its DCD students (the `exact` kind plays that part for the mixture-path rules).
The path is fixed: uniform source, kappa(t) = t (the authors' log-linear alpha_t = 1 - t), so a duo method takes no
source/scheduler/loss keys.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fsdfm.duo import DuoConfig, DuoObjective, ancestral_step
from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    DIT_SOURCES,
    SAMPLERS,
    Draw,
    RowCounter,
    build_model_config,
    corpus_for,
    fit_dit,
    forward_autocast,
    join_process_group,
    load_dit,
    oracle_model_metric,
    oracle_model_metrics,
    path_from_config,
    train_metrics,
)
from fsdfm.methods.exact_teacher import is_exact, load_exact
from fsdfm.model import DiT
from fsdfm.samplers import SampleOutput, time_grid
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec

DUO_PATH = {"source": "uniform", "scheduler": {"name": "polynomial", "n": 1.0}}
DUO_RULES = ("ancestral", "greedy_tail")
DUO_SAMPLER = "duo"  # the sampler below, which the released Duo checkpoints (kind released_duo) use too


class DuoSettings(DuoConfig):
    SPEC_HINT = "distill: {curriculum_start, curriculum_end, tau_log10_start, tau_log10_end, eps}"


def plan_duo(p: Planner, name: str, m: MethodSpec) -> Stage:
    config = {
        "data": p.data,
        "model": p.model_cfg(m),
        "duo": dataclasses.asdict(m.settings),
        "optim": p.optim(m),
    }
    return p.add(Stage("train_duo", config))


def plan_exact_duo(p: Planner, name: str, m: MethodSpec) -> Stage:
    """The exact posterior of the oracle source on Duo's fixed path (the exact kind's stage: nothing trained)."""
    return p.add(Stage("exact_posterior", {"data": p.data, **DUO_PATH}))


register_kind(MethodKind("duo", "duo", DUO_RULES, plan_duo, settings_key="distill", settings_cls=DuoSettings))
register_kind(MethodKind("exact_duo", "duo", DUO_RULES, plan_exact_duo, oracle_only=True))


@stage_kind(
    "train_duo",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=lambda c: oracle_model_metric(c),
    sources=("fsdfm.methods.duo:train_duo", *DIT_SOURCES, *DATA_SOURCES, "fsdfm.duo"),
    model_sampler="duo",
    model_rule="ancestral",
)
def train_duo(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Duo: a DiT on the uniform-state path, the curriculum's relaxed inputs first (fsdfm.duo.DuoObjective)."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    path = path_from_config(DUO_PATH, corpus.vocab_size)
    cfg = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len)
    torch.manual_seed(config["optim"]["seed"])
    model = DiT(cfg)
    res, final = fit_dit(
        model, DuoObjective(path, DuoConfig(**config["duo"])), corpus, config, out_dir, "train duo", DUO_PATH, False
    )
    optim = config["optim"]
    return train_metrics(
        res,
        {
            "train_steps": optim["steps"],
            "train_tokens": optim["steps"] * optim["batch_size"] * corpus.seq_len,
            "n_params": model.num_parameters(),
            **oracle_model_metrics(config, final, path, corpus),
        },
    )


@SAMPLERS.register("duo")
def sample_duo(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    """Uniform-state ancestral sampling on a uniform grid of cfg["steps"]; one counted forward per step. The model
    is the trained DiT, or the exact posterior for an exact_duo method (float64 log-probabilities as logits)."""
    # a released Duo checkpoint outputs the x0 of the authors' ELBO (their plug-in step); ours, trained with CE, and
    # the exact denoiser output the posterior (reweighted step): fsdfm.duo.ancestral_step
    if is_exact(model_dir):
        exact = load_exact(model_dir, cfg["data"])
        model, path, posterior = exact, exact.path, True
    else:
        m = load_dit(model_dir, dev)
        model, path, posterior = m.model, m.path, not m.released
    net = RowCounter(model)
    greedy_tail = cfg["rule"] == "greedy_tail"

    @torch.no_grad()
    def run(n, steps, gen):
        grid = time_grid(steps, t_end=cfg["t_end"], device=dev)
        kappa = path.scheduler.kappa(grid).tolist()
        chunks, wall = [], 0.0
        for start in range(0, n, cfg["batch_size"]):
            b = min(cfg["batch_size"], n - start)
            x = path.source.sample((b, corpus.seq_len), generator=gen, device=dev)
            t0 = time.perf_counter()
            for i in range(steps):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=forward_autocast(cfg)):
                    logits = net(x, grid[i].expand(b).float())
                p = torch.softmax(logits.double(), -1)
                last = i == steps - 1
                x = ancestral_step(x, p, kappa[i], kappa[i + 1], gen, greedy=greedy_tail and last, posterior=posterior)
            wall += time.perf_counter() - t0
            chunks.append(x)
        return SampleOutput(tokens=torch.cat(chunks).cpu(), nfe=steps, time_grid=grid.cpu(), wall_s=wall)

    run(min(cfg["batch_size"], cfg["n_samples"]), 1, torch.Generator(dev).manual_seed(0))  # warm-up
    net.reset()
    return Draw(lambda gen: run(cfg["n_samples"], cfg["steps"], gen), net)


# 2: the posterior is reweighted by 1 / q(x_t | x_1) before the authors' plug-in formula (fsdfm.duo), which makes
# the step exact for a cross-entropy-trained denoiser; enters the sample stages' ids (fsdfm.methods.base)
sample_duo.version = "2"
