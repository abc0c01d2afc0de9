"""Load the released FS-DFM and DFM 1.3B checkpoints of apple/ml-fs-dfm into the suite's `DiT`.

    loaded = load_released("checkpoint_step_190000.pth")          # FS-DFM: the EMA student when present
    logits = loaded.model(x_t, t, h)                              # x_t (B, L) GPT-2 ids, t, h (B,)

Facts this module relies on, read (not copied; the licence is non-commercial) from apple/ml-fs-dfm at commit
d3797985cbfa0c4f4cf83915b2aef1e1aef5ba78:

* Model: `fs_dfm/model/transformer.py` (the student, built with `dt_conditioned=True`),
  `pre_training/model/transformer.py` (the DFM: the same network without the dt path), `fs_dfm/model/rotary.py`.
  With width d, condition width c, V output classes (V + 1 rows in both the embedding and the output layer
  for a mask source; the released models use the uniform source, so neither has a mask row), names and shapes:

      vocab_embed.weight                               (V, d)
      time_embedding.mlp.{0,2}.{weight,bias}           (c, 256), (c,) | (c, c), (c,)   Linear-SiLU-Linear
      dt_embedding.mlp.{0,2}.{weight,bias}             same, student only
      time_condition_fuser.{weight,bias}               (2c, 2c), (2c,)                  student only
      rotary_emb.inv_freq                              (d_head/2,) buffer, base^(-2i/d_head), base 10,000
      blocks.{i}.norm{1,2}.weight                      (d,)   LayerNorm, weight only, eps 1e-5 (F.layer_norm's)
      blocks.{i}.{qw,kw,vw,attn_out}.weight            (d, d) no biases
      blocks.{i}.mlp.{0,2}.{weight,bias}               (4d, d), (4d,) | (d, 4d), (d,)   tanh-GELU between
      blocks.{i}.adaLN_modulation.{weight,bias}        (6d, c), (6d,)  chunks: shift, scale, gate (attn), same (MLP)
      blocks.{i}.condition_fuser.{weight,bias}         (c, 2c), (c,)                    student only
      output_layer.norm_final.weight                   (d,)
      output_layer.adaLN_modulation.{weight,bias}      (2d, c), (2d,)  chunks: shift, scale
      output_layer.condition_fuser.{weight,bias}       (c, 2c), (c,)                    student only
      output_layer.linear.{weight,bias}                (V, d), (V,)

* Forward: t and the step size dt enter unscaled (t in [0, 1]; dt = t_{i+1} - t_i, see
  `flow_matching/solver/discrete_solver_fsdfm.py` and `fs_dfm/logic/training.py`) into 256 sinusoidal features
  [cos, sin] with max period 10^4. DFM: c = silu(e_t). Student: c = silu(W_f [e_t ; e_dt] + b_f), and each block
  and the output layer use silu(W_b c + b_b). Block: x + gate * attn_out(SDPA(rot(q), rot(k), v)) on
  modulate(norm1(x)) (heads split as (B, L, H, d_head), rotate-half rotary on q and k, no mask), then
  x + gate * mlp(modulate(norm2(x))); modulate(y) = y (1 + scale) + shift. Output: linear(modulate(norm_final(x))).
  Dropout (0.1) is off in eval. Their blocks run under CUDA bf16 autocast; we run at the model's dtype (fp32).
  In our DiT this is `released_config(...)`: t_scale=1, norm_weight=True, norm_eps=1e-5, h_fusion="concat",
  h_embedding="raw"; the rotary convention and the adaLN chunk order already agree; their separate q, k, v
  projections are concatenated into our fused `qkv`.
* Checkpoints: `fs_dfm/logic/state.py` saves {"step", "train_sampler", "test_sampler", "teacher_model",
  "teacher_optimizer", "student_model", "student_optimizer", "student_ema_model"};
  `pre_training/logic/state.py` saves {"model", "optimizer", "step", "train_sampler", "test_sampler"}; both are
  read back with torch.load(weights_only=True) (`fs_dfm/utils/checkpointing.py`), and `fs_dfm/train.py` takes the
  DFM weights from "model", else "teacher_model". State dicts come from the DDP-unwrapped module; a compiled
  module saved without DDP has `_orig_mod.`-prefixed names, so `module.` and `_orig_mod.` prefixes are stripped.
* Size: README.md lists both released checkpoints as 1.3B, uniform source; `pre_training/configs/config.yaml`
  holds the 1.3B block (hidden_size 2048, cond_dim 256, n_blocks 21, n_heads 32, length 1024); the vocabulary is
  GPT2TokenizerFast's (50,257, `fs_dfm/train.py`).

Unless a config is given, it is read off the checkpoint's shapes (width, condition width, depth, vocabulary,
MLP ratio, head size from `rotary_emb.inv_freq`) on top of `released_config`, so smaller models of the same
family load too.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdfm.model import DiT, ModelConfig, Rotary, released_config
from fsdfm.registry import Registry

# Where each of our parameters comes from: our name (regex, matched in full) -> their name(s), as `re` templates.
# Several names are concatenated along dim 0 (their q, k, v projections form our fused qkv).
NAME_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"tok_emb\.weight", ("vocab_embed.weight",)),
    (r"t_emb\.mlp\.([02])\.(weight|bias)", (r"time_embedding.mlp.\1.\2",)),
    (r"h_emb\.mlp\.([02])\.(weight|bias)", (r"dt_embedding.mlp.\1.\2",)),
    (r"cond_fuser\.(weight|bias)", (r"time_condition_fuser.\1",)),
    (r"blocks\.(\d+)\.qkv\.weight", (r"blocks.\1.qw.weight", r"blocks.\1.kw.weight", r"blocks.\1.vw.weight")),
    (r"blocks\.(\d+)\.(norm[12]\.weight|attn_out\.weight|mlp\.[02]\.(?:weight|bias))", (r"blocks.\1.\2",)),
    (r"blocks\.(\d+)\.adaLN\.(weight|bias)", (r"blocks.\1.adaLN_modulation.\2",)),
    (r"blocks\.(\d+)\.cond_fuser\.(weight|bias)", (r"blocks.\1.condition_fuser.\2",)),
    (r"norm_out\.weight", ("output_layer.norm_final.weight",)),
    (r"cond_fuser_out\.(weight|bias)", (r"output_layer.condition_fuser.\1",)),
    (r"adaLN_out\.(weight|bias)", (r"output_layer.adaLN_modulation.\1",)),
    (r"head\.(weight|bias)", (r"output_layer.linear.\1",)),
)
_NAME_MAP = tuple((re.compile(ours), theirs) for ours, theirs in NAME_MAP)

ROTARY_BUFFER = "rotary_emb.inv_freq"  # theirs only: checked against our rotary tables, then dropped
ROTARY_BASE = 10_000.0
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
MAX_LISTED = 8

# `which` -> the top-level checkpoint keys to try, in order.
ENTRIES: Registry = Registry("checkpoint entry")
ENTRIES.register("student_ema", ("student_ema_model",))
ENTRIES.register("student", ("student_model",))
ENTRIES.register("teacher", ("model", "teacher_model"))  # their own order for the DFM weights
ENTRIES.register("auto", ("student_ema_model", "student_model", "model", "teacher_model"))
KNOWN_ENTRIES = ("student_ema_model", "student_model", "model", "teacher_model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the DiT; `mismatches` lists the offending names, if any."""

    def __init__(self, message: str, mismatches: tuple[Mismatch, ...] = ()):
        super().__init__(message)
        self.mismatches = mismatches


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the given path."""


MISMATCH_KINDS = ("missing", "unexpected", "wrong shape", "wrong value", "not a tensor")


@dataclass(frozen=True)
class Mismatch:
    """One name of their layout that does not fit: kind in MISMATCH_KINDS; expected / got: shapes (None: absent)."""

    name: str
    kind: str
    expected: tuple[int, ...] | None
    got: tuple[int, ...] | None
    note: str = ""

    def __str__(self) -> str:
        def show(shape):
            return "absent" if shape is None else str(tuple(shape))

        extra = f"; {self.note}" if self.note else ""
        return f"{self.name}: {self.kind}, expected {show(self.expected)}, got {show(self.got)}{extra}"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """model: the DiT in eval mode; config: its ModelConfig; source_key: the top-level checkpoint entry read;
    h_conditioned: whether the model takes the step size h (the FS-DFM student) or not (the DFM)."""

    model: DiT
    config: ModelConfig
    source_key: str
    h_conditioned: bool


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Drop leading `module.` (DDP) and `_orig_mod.` (torch.compile) from every name, in any nesting."""
    out = {}
    for name, value in state_dict.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def their_names(our_name: str) -> tuple[str, ...]:
    """Their parameter name(s) for one of ours (several: concatenated along dim 0)."""
    for pattern, templates in _NAME_MAP:
        m = pattern.fullmatch(our_name)
        if m:
            return tuple(m.expand(t) for t in templates)
    raise KeyError(f"no entry in fsdfm.released_checkpoints.NAME_MAP for our parameter {our_name!r}")


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state-dict shapes for `cfg`, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in DiT(cfg).state_dict().items()}


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(d_head/2,) base^(-2i/d_head): what their `rotary_emb.inv_freq` holds when it agrees with our Rotary."""
    d_head = cfg.hidden // cfg.n_heads
    return 1.0 / ROTARY_BASE ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)


def mismatch_error(where: str, cfg: ModelConfig, problems: list[Mismatch]) -> CheckpointError:
    """One CheckpointError for all `problems`: counts by kind, then the first MAX_LISTED (name, expected, got)."""
    counts = {n: sum(p.kind == n for p in problems) for n in MISMATCH_KINDS}
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return CheckpointError(
        f"{where} does not match the DiT config (hidden={cfg.hidden}, cond_dim={cfg.cond_dim}, "
        f"n_blocks={cfg.n_blocks}, n_heads={cfg.n_heads}, vocab_size={cfg.vocab_size}, "
        f"h_embedding={cfg.h_embedding!r}): {len(problems)} mismatches "
        f"({', '.join(f'{v} {k}' for k, v in counts.items() if v)}); first ones:\n{listed}{more}",
        tuple(problems),
    )


def convert_state_dict(their_sd: dict, cfg: ModelConfig, where: str = "state dict") -> dict[str, torch.Tensor]:
    """Their state dict (names as in apple/ml-fs-dfm, wrapper prefixes allowed) -> ours for DiT(cfg).

    Every mismatch is collected first, then one CheckpointError lists the first MAX_LISTED of them
    (name, expected shape, got shape); `where` names the source (file and entry) in the message.
    """
    theirs = strip_wrapper_prefixes(their_sd)
    problems: list[Mismatch] = []
    for name, value in theirs.items():
        if not isinstance(value, torch.Tensor):
            problems.append(Mismatch(name, "not a tensor", None, None, f"a {type(value).__name__}"))
    tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}

    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for our_name, our_shape in expected_shapes(cfg).items():
        names = their_names(our_name)
        # Each source holds an equal slice of our dim 0.
        part = torch.Size((our_shape[0] // len(names), *our_shape[1:]))
        parts = []
        for name in names:
            used.add(name)
            got = tensors.get(name)
            if got is None:
                problems.append(Mismatch(name, "missing", tuple(part), None))
            elif got.shape != part:
                problems.append(Mismatch(name, "wrong shape", tuple(part), tuple(got.shape)))
            else:
                parts.append(got)
        if len(parts) == len(names):
            ours[our_name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    if ROTARY_BUFFER in tensors:
        used.add(ROTARY_BUFFER)
        want, got = rotary_inv_freq(cfg), tensors[ROTARY_BUFFER]
        if got.shape != want.shape:
            problems.append(
                Mismatch(ROTARY_BUFFER, "wrong shape", tuple(want.shape), tuple(got.shape), "head size differs")
            )
        elif not torch.allclose(got.float(), want, rtol=1e-5, atol=0.0):
            problems.append(
                Mismatch(
                    ROTARY_BUFFER,
                    "wrong value",
                    tuple(want.shape),
                    tuple(got.shape),
                    f"not base {ROTARY_BASE:g} rotary frequencies",
                )
            )
    problems += [Mismatch(k, "unexpected", None, tuple(v.shape)) for k, v in tensors.items() if k not in used]

    if problems:
        raise mismatch_error(where, cfg, problems)
    return ours


def infer_config(their_sd: dict, **overrides) -> ModelConfig:
    """`released_config` with the sizes read off their state dict's shapes (where present), then `overrides`.

    h-conditioned (kind "fsdfm") iff any `dt_embedding.*` name is present.
    """
    sd = {k: v for k, v in strip_wrapper_prefixes(their_sd).items() if isinstance(v, torch.Tensor)}
    kind = "fsdfm" if any(k.startswith("dt_embedding.") for k in sd) else "dfm"
    sizes: dict[str, int] = {}
    # One canonical name per size; every other name is then checked against the config by convert_state_dict.
    # Their embedding and output layer have the same rows (V, or V + 1 for a mask source, which thus loads as a
    # (V + 1)-class model computing exactly their function; the released models have no mask row).
    if (w := sd.get("vocab_embed.weight")) is not None and w.ndim == 2:
        sizes.update(input_vocab_size=w.shape[0], vocab_size=w.shape[0], hidden=w.shape[1])
    if (w := sd.get("time_embedding.mlp.2.weight")) is not None and w.ndim == 2:
        sizes["cond_dim"] = w.shape[0]
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if blocks:
        sizes["n_blocks"] = max(blocks) + 1
    hidden = sizes.get("hidden", released_config(kind).hidden)
    if (w := sd.get("blocks.0.mlp.0.weight")) is not None and w.ndim == 2 and w.shape[0] % hidden == 0:
        sizes["mlp_ratio"] = w.shape[0] // hidden
    if (w := sd.get(ROTARY_BUFFER)) is not None and w.ndim == 1 and w.numel() and hidden % (2 * w.numel()) == 0:
        sizes["n_heads"] = hidden // (2 * w.numel())
    try:
        return released_config(kind, **{**sizes, **overrides})
    except ValueError as err:
        raise CheckpointError(f"the shapes in this state dict give no valid DiT config: {err}") from err


def read_checkpoint(path: str | Path) -> dict:
    """torch.load(path, map_location="cpu", weights_only=True), memory-mapped when the file allows it (the
    released files also hold optimizer states we never read). Errors say which file and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        reason = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
        raise CheckpointError(
            f"torch.load(weights_only=True) refused {path}: it is not a plain tensor checkpoint"
            + (f" ({reason})" if reason else " (not a readable PyTorch file)")
            + "; arbitrary pickled objects are never loaded, since unpickling them can run code"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def select_entry(checkpoint: dict, which: str, path: str | Path) -> str:
    """The top-level key `which` resolves to in this checkpoint (see ENTRIES)."""
    candidates = ENTRIES.get(which)
    found = [k for k in candidates if k in checkpoint]
    if not found:
        present = [str(k) for k in checkpoint][:20]
        raise CheckpointError(
            f"{path}: no {' or '.join(map(repr, candidates))} entry for which={which!r}; "
            f"known layouts have {', '.join(map(repr, KNOWN_ENTRIES))}; this file's top-level keys: {present}"
        )
    if not isinstance(checkpoint[found[0]], dict):
        raise CheckpointError(
            f"{path}: entry {found[0]!r} is a {type(checkpoint[found[0]]).__name__}, not a state dict"
        )
    return found[0]


def load_released(
    path: str | Path, which: str = "auto", device: str | torch.device = "cpu", config: ModelConfig | None = None
) -> LoadedCheckpoint:
    """Load a released apple/ml-fs-dfm checkpoint (or one of the same family) into our DiT.

    which: "student_ema" | "student" | "teacher" | "auto" (EMA student, student, then the DFM weights).
    config: the expected ModelConfig; None reads the sizes off the checkpoint (see `infer_config`).
    """
    checkpoint = read_checkpoint(path)
    key = select_entry(checkpoint, which, path)
    their_sd = checkpoint[key]
    cfg = config if config is not None else infer_config(their_sd)
    ours = convert_state_dict(their_sd, cfg, where=f"{path} [{key!r}]")
    with torch.device("meta"):  # no random init of ~1.3B parameters that are overwritten next
        model = DiT(cfg)
    model.to_empty(device=device)
    model.load_state_dict(ours, strict=True)
    # to_empty leaves the non-persistent rotary tables uninitialised: rebuild them.
    model.rotary = Rotary(cfg.hidden // cfg.n_heads, cfg.seq_len).to(device)
    return LoadedCheckpoint(model=model.eval(), config=cfg, source_key=key, h_conditioned=cfg.h_embedding != "none")
