"""Kind "ar": the autoregressive GPT-2-style baseline (and, with role "evaluator", the suite's reference
evaluator), trained and sampled through Hugging Face transformers (fsdfm.ar).

Registers on itself: its planning (one train_ar stage), the stage `train_ar` and the sampler "ar".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fsdfm.methods.base import MethodKind, Planner, register_kind
from fsdfm.methods.common import (
    DATA_SOURCES,
    forward_autocast,
    SAMPLERS,
    Draw,
    build_model_config,
    corpus_for,
    device,
    join_process_group,
    save_tokenizer,
    train_metrics,
)
from fsdfm.study.graph import Stage, stage_kind
from fsdfm.study.spec import MethodSpec
from fsdfm.train import OptimConfig


def plan_ar(p: Planner, name: str, m: MethodSpec) -> Stage:
    return p.add(Stage("train_ar", {"role": "baseline", "data": p.data, "model": p.model_cfg(m), "optim": p.optim(m)}))


register_kind(MethodKind("ar", "ar", ("ancestral",), plan_ar))


@stage_kind(
    "train_ar",
    checkpointable=True,
    resources="gpu_multi",
    version="1",
    metrics=("val_nll", "elbo_ppl"),
    sources=(
        "fsdfm.methods.ar:train_ar_stage",
        "fsdfm.ar",
        "fsdfm.train",
        *DATA_SOURCES,
        "fsdfm.methods.common:build_model_config",
        "fsdfm.methods.common:train_metrics",
    ),
    model_sampler="ar",
    model_rule="ancestral",
)
def train_ar_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """An autoregressive GPT-2-style model (the AR baseline, or the suite's reference evaluator), saved with
    save_pretrained together with the corpus tokenizer."""
    from fsdfm.ar import ARConfig, train_ar  # heavy: transformers (GPT-2), only for the AR stages

    join_process_group()
    corpus = corpus_for(config, out_dir)
    dims = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len)
    cfg = ARConfig(
        vocab_size=corpus.vocab_size,
        seq_len=corpus.seq_len,
        hidden=dims.hidden,
        n_blocks=dims.n_blocks,
        n_heads=dims.n_heads,
    )
    torch.manual_seed(config["optim"]["seed"])
    hf_tok = corpus.tokenizer.to_hf() if corpus.tokenizer is not None else None
    res = train_ar(
        corpus.train,
        cfg,
        OptimConfig(**config["optim"]),
        Path(out_dir),
        bos_id=corpus.eos_id or 0,
        hf_tokenizer=hf_tok,
        valid=corpus.valid,
        device=device(),
    )
    save_tokenizer(out_dir, corpus)
    return train_metrics(
        res.fit, {"val_nll": res.val_nll, "elbo_ppl": float(np.exp(res.val_nll)), "n_params": res.n_params}
    )


@SAMPLERS.register("ar")
def sample_ar_model(model_dir: Path, cfg: dict, corpus, dev) -> Draw:
    from transformers import AutoModelForCausalLM  # heavy: only the AR stages need it

    from fsdfm.ar import sample_ar  # heavy: transformers (GPT-2), only for the AR stages

    model = AutoModelForCausalLM.from_pretrained(Path(model_dir) / "hf").to(dev).eval()
    kw = dict(
        seq_len=corpus.seq_len,
        bos_id=corpus.eos_id or 0,
        use_cache=True,
        batch_size=cfg["batch_size"],
        dtype=getattr(torch, cfg["precision"]),
    )
    bf16 = forward_autocast(cfg)

    def draw(n, gen, **over):
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
            return sample_ar(model, n, generator=gen, **{**kw, **over})

    draw(min(2, cfg["n_samples"]), torch.Generator(dev).manual_seed(0), seq_len=4)
    return Draw(lambda gen: draw(cfg["n_samples"], gen))
