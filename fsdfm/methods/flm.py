"""Kind "flm": the flow language model, a DiT reading the noisy one-hot state x_gamma (fsdfm.flm).

Registers on itself: its settings (`distill:` builds `FLMConfig`), its planning (one train_flm stage), the stage
`train_flm` and the sampler "flm"; `continuous_sampler` is shared with the fmlm kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fsdfm.flm import FLMConfig, FLMObjective, FLMTime, sample_continuous
from fsdfm.methods.base import MethodKind, Planner, register_kind
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
    train_metrics,
)
from fsdfm.model import DiT
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec


def plan_flm(p: Planner, name: str, m: MethodSpec) -> Stage:
    # the `distill:` mapping as written (not the filled-in FLMConfig): that is what the stage ids have hashed
    return p.add(
        Stage("train_flm", {"data": p.data, "model": p.model_cfg(m), "flm": dict(m.distill), "optim": p.optim(m)})
    )


register_kind(MethodKind("flm", "flm", ("euler",), plan_flm, settings_key="distill", settings_cls=FLMConfig))


@stage_kind(
    "train_flm",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    sources=("fsdfm.methods.flm:train_flm", *DIT_SOURCES, *DATA_SOURCES, "fsdfm.flm"),
    model_sampler="flm",
    model_rule="euler",
)
def train_flm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """FLM: a DiT reading the noisy one-hot state x_gamma, trained with CE at tau ~ U[0, 1]."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len)
    torch.manual_seed(config["optim"]["seed"])
    model = DiT(cfg)
    res, _ = fit_dit(
        model,
        FLMObjective(FLMTime(corpus.vocab_size), FLMConfig(**config["flm"])),
        corpus,
        config,
        out_dir,
        "train flm",
        {"continuous": "flm"},
        h_conditioned=False,
    )
    return train_metrics(res, {"n_params": model.num_parameters()})


def continuous_sampler(two_time: bool) -> Callable:
    def prepare(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
        m = load_dit(model_dir, dev)
        counter = RowCounter(m.model)
        time = FLMTime(corpus.vocab_size)
        net = (lambda x, s, t: counter(x, s, t)) if two_time else (lambda x, s, t: counter(x, s))
        kw = dict(
            seq_len=corpus.seq_len,
            precision=getattr(torch, cfg["precision"]),
            device=dev,
            max_state_bytes=cfg.get("max_state_bytes", 1 << 28),
            autocast=forward_autocast(cfg),
        )
        sample_continuous(net, time, n_samples=min(2, cfg["n_samples"]), n_steps=1, seed=0, **kw)  # warm-up
        counter.reset()
        # seeded by cfg["seed"] per chunk (fsdfm.flm.sample_noise), not by the stage's generator
        return Draw(
            lambda gen: sample_continuous(
                net, time, n_samples=cfg["n_samples"], n_steps=cfg["steps"], seed=cfg["seed"], **kw
            ),
            counter,
        )

    return prepare


SAMPLERS.register("flm", continuous_sampler(two_time=False))
