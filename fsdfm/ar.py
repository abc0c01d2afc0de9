"""The autoregressive baseline and the suite's reference evaluator: a GPT-2 (Hugging Face `transformers`).

Built as `GPT2LMHeadModel` so that `save_pretrained` / `AutoModelForCausalLM.from_pretrained` is the real loading
path, exactly as for a published evaluator such as gpt2-large.

Conventions
  * A block x (B, L) of data tokens is modelled with a BOS token prepended (BOS = EOS id, the GPT-2 convention, passed
    explicitly): p(x) = prod_{i<L} p(x_i | BOS, x_{<i}), so every data token, the first included, is predicted.
    n_positions = L + 1 leaves room for the BOS position (and for scoring one token after a full block).
  * Width and depth follow the DiT's `ModelConfig` (`ARConfig.from_model_config`), MLP width 4 * hidden, dropout 0,
    input and output embeddings tied (GPT-2's default).
  * Sampling draws one token per network evaluation (NFE = L) with a KV cache; categorical draws in float64 by
    default, since low-precision sampling is a known way to get an artificially low perplexity.

Artefacts of `train_ar(..., out_dir)`: out_dir/ckpt/ (resumable training checkpoint) and out_dir/hf/
(save_pretrained of the model -- EMA weights when EMA is on -- and of the tokenizer when one is given).
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from fsdfm.samplers import SampleOutput
from fsdfm.train import FitResult, OptimConfig, StepContext, fit

__all__ = [
    "ARConfig",
    "ARTrainResult",
    "ar_loss",
    "ar_nll",
    "build_ar",
    "sample_ar",
    "train_ar",
    "train_reference_evaluator",
]


@dataclass(frozen=True)
class ARConfig:
    """Size of the GPT-2: vocabulary V, block length L (n_positions = L + 1), width, depth and heads."""

    vocab_size: int
    seq_len: int
    hidden: int = 128
    n_blocks: int = 4
    n_heads: int = 4

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "hidden", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ARConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"ARConfig.hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")

    @classmethod
    def from_model_config(cls, cfg: Any) -> "ARConfig":
        """The AR baseline of the same width and depth as a DiT `fsdfm.model.ModelConfig` (output vocabulary V:
        the mask source's extra input row has no AR counterpart)."""
        return cls(
            vocab_size=int(cfg.vocab_size),
            seq_len=int(cfg.seq_len),
            hidden=int(cfg.hidden),
            n_blocks=int(cfg.n_blocks),
            n_heads=int(cfg.n_heads),
        )


def build_ar(cfg: ARConfig, bos_id: int | None = None) -> GPT2LMHeadModel:
    """A freshly initialised GPT2LMHeadModel for `cfg`: n_positions = seq_len + 1, dropout 0, tied embeddings.
    bos_id (if given) is recorded as the config's bos_token_id and eos_token_id (GPT-2: one token for both)."""
    if bos_id is not None and not 0 <= bos_id < cfg.vocab_size:
        raise ValueError(f"bos_id {bos_id} is not a token id of the vocabulary (size {cfg.vocab_size})")
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len + 1,
        n_embd=cfg.hidden,
        n_layer=cfg.n_blocks,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_id,
        eos_token_id=bos_id,
    )
    return GPT2LMHeadModel(config)


def _check_batch(batch: torch.Tensor, model: Any, bos_id: int) -> None:
    vocab = _unwrap(model).config.vocab_size
    if batch.ndim != 2 or batch.dtype != torch.long:
        raise ValueError(f"AR batch must be a (B, L) LongTensor, got {tuple(batch.shape)} {batch.dtype}")
    if not 0 <= bos_id < vocab:
        raise ValueError(f"bos_id {bos_id} is not a token id of the model's vocabulary (size {vocab})")
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
        bad = batch[(batch < 0) | (batch >= vocab)][0]
        raise ValueError(f"AR batch holds token id {int(bad)}, outside the model's vocabulary (size {vocab})")


def _unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _with_bos(batch: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Inputs [BOS, x_0, ..., x_{L-2}] (B, L): position i predicts x_i."""
    bos = torch.full((batch.shape[0], 1), bos_id, dtype=batch.dtype, device=batch.device)
    return torch.cat([bos, batch[:, :-1]], dim=1)


def ar_loss(model: Any, batch: torch.Tensor, bos_id: int, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of batch (B, L) with BOS prepended:
    -1/(B L) sum_{b, i} log p(x_{b,i} | BOS, x_{b,<i}) for reduction="mean"; per-token NLL (B, L) for "none"."""
    _check_batch(batch, model, bos_id)
    logits = model(input_ids=_with_bos(batch, bos_id)).logits  # (B, L, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none")  # (B, L)
    if reduction == "none":
        return nll
    if reduction != "mean":
        raise ValueError(f"ar_loss reduction must be 'mean' or 'none', got {reduction!r}")
    return nll.mean()


@torch.no_grad()
def ar_nll(model: Any, blocks: torch.Tensor, bos_id: int, batch_size: int = 64) -> float:
    """Mean per-token NLL (nats) of blocks (N, L) under the model, BOS prepended: the held-out `val_nll`."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"ar_nll needs a non-empty (N, L) tensor of blocks, got shape {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        chunk = blocks[start : start + batch_size].to(device)
        total += float(ar_loss(model, chunk, bos_id, reduction="none").double().sum())
    model.train(was_training)
    return total / blocks.numel()


def _cache_kwarg(hf: Any) -> str:
    """The name under which the model's forward takes its `Cache` object: `cache` (transformers >= 5.2x; the old
    name `past_key_values` is deprecated there and removed in 5.40), else `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_ar(
    model: Any,
    n: int,
    seq_len: int,
    bos_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    temperature: float = 1.0,
) -> SampleOutput:
    """n sequences (n, seq_len) by ancestral sampling from BOS, one token per network evaluation (NFE = seq_len).

    Step i: p_i = softmax(logits_i.to(dtype) / temperature) over the V tokens (logits of the last position);
    x_i ~ Categorical(p_i) with torch.multinomial(generator). With use_cache the model reads only the newest token
    and a `transformers.DynamicCache` of the earlier keys/values (KV cache); without, the full prefix [BOS, x_0..x_{i-1}] every step (same draws, up to
    floating-point rounding of the logits). Batches of `batch_size` (default: all n) run one after another;
    wall_s counts sampling only (CUDA synchronised). time_grid: (seq_len + 1,) the generated fraction i / L.
    """
    if n < 1 or seq_len < 1:
        raise ValueError(f"sample_ar needs n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if not temperature > 0:
        raise ValueError(f"sample_ar temperature must be > 0, got {temperature!r}")
    hf = _unwrap(model)
    max_len = hf.config.n_positions
    if seq_len > max_len:
        raise ValueError(f"sample_ar seq_len {seq_len} exceeds the model's n_positions ({max_len})")
    vocab = hf.config.vocab_size
    if not 0 <= bos_id < vocab:
        raise ValueError(f"bos_id {bos_id} is not a token id of the model's vocabulary (size {vocab})")
    batch_size = batch_size or n
    cache_kw = _cache_kwarg(hf)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks, wall = [], 0.0
    for start in range(0, n, batch_size):
        B = min(batch_size, n - start)
        x = torch.full((B, 1), bos_id, dtype=torch.long, device=device)  # [BOS, x_0, ..., x_{i-1}]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        # transformers' Cache API: the model appends each step's keys/values to this object in place
        cache = {cache_kw: DynamicCache()} if use_cache else None
        for i in range(seq_len):
            if use_cache:
                out = model(input_ids=x[:, -1:] if i else x, use_cache=True, **cache)
            else:
                out = model(input_ids=x, use_cache=False)
            p = torch.softmax(out.logits[:, -1, :vocab].to(dtype) / temperature, dim=-1)
            x = torch.cat([x, torch.multinomial(p, 1, generator=generator)], dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        chunks.append(x[:, 1:].cpu())
    model.train(was_training)
    grid = torch.arange(seq_len + 1, dtype=torch.float64) / seq_len
    return SampleOutput(tokens=torch.cat(chunks), nfe=seq_len, time_grid=grid, wall_s=wall)


@dataclass(frozen=True)
class ARTrainResult:
    """fit: the FitResult of training; hf_dir: the save_pretrained folder; val_nll: mean NLL per token (nats) of the
    held-out blocks under the saved weights (None without held-out data); n_params: parameter count (tied once)."""

    fit: FitResult
    hf_dir: Path
    val_nll: float | None
    n_params: int


def train_ar(
    data: torch.Tensor,
    cfg: ARConfig,
    optim: OptimConfig,
    out_dir: str | Path,
    bos_id: int,
    hf_tokenizer: Any | None = None,
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ARTrainResult:
    """Train a GPT-2 on blocks data (N, L) with `ar_loss` through `fsdfm.train.fit` (checkpoints in out_dir/ckpt,
    resumed when present), then save it -- EMA weights when optim.ema_decay is set -- with save_pretrained into
    out_dir/hf, together with `hf_tokenizer` (a transformers tokenizer) when given. The folder is written under a
    temporary name and renamed, so a half-written model is never loaded."""
    if data.ndim != 2 or data.shape[1] != cfg.seq_len:
        raise ValueError(f"train_ar: data must be (N, {cfg.seq_len}) blocks, got shape {tuple(data.shape)}")
    if valid is not None and (valid.ndim != 2 or valid.shape[1] != cfg.seq_len):
        raise ValueError(f"train_ar: valid must be (N, {cfg.seq_len}) blocks, got shape {tuple(valid.shape)}")
    out_dir = Path(out_dir)
    torch.manual_seed(optim.seed)  # initial weights are a function of the optimisation seed
    model = build_ar(cfg, bos_id=bos_id)
    _check_batch(data[:1], model, bos_id)

    def loss_fn(ctx: StepContext) -> torch.Tensor:
        return ar_loss(ctx.model, ctx.batch, bos_id)

    res = fit(model, loss_fn, data, optim, ckpt_dir=out_dir / "ckpt", desc="train ar", device=device, progress=progress)
    final = res.ema if res.ema is not None else res.model
    val_nll = ar_nll(final, valid, bos_id) if valid is not None else None
    hf_dir = out_dir / "hf"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return ARTrainResult(fit=res, hf_dir=hf_dir, val_nll=val_nll, n_params=final.num_parameters())  # rank 0 saves
    tmp = out_dir / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(str(tmp))
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)
    return ARTrainResult(fit=res, hf_dir=hf_dir, val_nll=val_nll, n_params=final.num_parameters())


def train_reference_evaluator(
    train_blocks: torch.Tensor,
    hf_tokenizer: Any,
    cfg: ARConfig,
    optim: OptimConfig,
    out_dir: str | Path,
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Path:
    """The suite's own evaluator LM for gen_ppl at small scale: an AR model trained on the corpus's train blocks
    (N, L), BOS = the tokenizer's EOS, saved with its tokenizer so that `AutoModelForCausalLM.from_pretrained(path)`
    and `AutoTokenizer.from_pretrained(path)` load it offline. Returns that path (out_dir/hf)."""
    eos = hf_tokenizer.eos_token_id
    if eos is None:
        raise ValueError("train_reference_evaluator: the tokenizer has no eos_token (it doubles as BOS)")
    if len(hf_tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"train_reference_evaluator: the tokenizer has {len(hf_tokenizer)} tokens, more than "
            f"ARConfig.vocab_size ({cfg.vocab_size})"
        )
    return train_ar(
        train_blocks,
        cfg,
        optim,
        out_dir,
        bos_id=eos,
        hf_tokenizer=hf_tokenizer,
        valid=valid,
        device=device,
        progress=progress,
    ).hf_dir
