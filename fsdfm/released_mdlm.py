"""Load the public MDLM-family checkpoints (MDLM OWT, the SDTT students, Duo and Duo+DCD) into the suite's `DiT`.

    loaded = load_mdlm_family("mdlm-owt/model.safetensors", "mdlm")    # "usdm": Duo / DCD; or a Lightning .ckpt
    logits = loaded.model(x_t, t)          # x_t (B, L) GPT-2 ids (+ mask id V for "mdlm"), t (B,) our time

Facts this module relies on, read (never copied) from the authors' public code:
kuleshov-group/mdlm (Apache-2.0) at c112c526d193436838c98d81455ee51f90309470 (`models/dit.py`, `diffusion.py`,
`noise_schedule.py`, `models/ema.py`, `configs/config.yaml`, `configs/model/small.yaml`); s-sahoo/duo (Apache-2.0)
at 7c9b498f5b717de064d6fad7e2509c866e6cb620 (`models/dit.py`, `trainer_base.py`, `algo.py`, `dataloader.py`,
`configs/noise/log-linear.yaml`); jdeschena/sdtt (no licence: facts only) at
9172b86500126d4ca93bd5e204395c5062fdc7fd (`src/sdtt/models/dit_orig.py`, `src/sdtt/core/diffusion/absorbing.py`,
`src/sdtt/core/distill/multi_round_sdtt.py`, `src/sdtt/push_to_hub.py`, `src/sdtt/configs/config.yaml`).

* One backbone, `DIT` (SDTT's `dit_orig.DIT` is MDLM's; Duo's adds a causal AR variant, not loaded here). Width d,
  condition width c, V_in embedding rows (= output rows), names and shapes:

      vocab_embed.embedding                       (V_in, d)   a bare Parameter, looked up by id
      sigma_map.mlp.{0,2}.{weight,bias}           (c, 256), (c,) | (c, c), (c,)   Linear-SiLU-Linear
      rotary_emb.inv_freq                         (d_head/2,) persistent buffer, 10,000^(-2i/d_head)
      blocks.{i}.norm{1,2}.weight                 (d,)   F.layer_norm in fp32 (eps 1e-5, no bias) times weight
      blocks.{i}.attn_qkv.weight                  (3d, d) no bias; columns 'b s (three h d)': q, k, v, head-major
      blocks.{i}.attn_out.weight                  (d, d)  no bias
      blocks.{i}.mlp.{0,2}.{weight,bias}          (4d, d), (4d,) | (d, 4d), (d,)   tanh-GELU between
      blocks.{i}.adaLN_modulation.{weight,bias}   (6d, c), (6d,) chunks: shift, scale, gate (attn), same (MLP)
      output_layer.norm_final.weight              (d,)
      output_layer.linear.{weight,bias}           (V_in, d), (V_in,)
      output_layer.adaLN_modulation.{weight,bias} (2d, c), (2d,)  chunks: shift, scale

  Forward: c = silu(sigma_map(256 sinusoidal features [cos, sin] of sigma, max period 10^4)); each block is
  x + gate * attn_out(attention(rot(q), rot(k), v)) on modulate(norm1(x)), then x + gate * mlp(modulate(norm2(x))),
  modulate(y) = y (1 + scale) + shift; rotary is flash-attn's non-interleaved rotate-half; attention is
  bidirectional with scale 1/sqrt(d_head); output linear(modulate(norm_final(x))). Dropout (0.1) is off in eval.
  Their blocks run under CUDA bf16 autocast; ours at the model's dtype (fp32). This is our DiT with
  norm_weight=True, norm_eps=1e-5, the fused qkv as is; only the scalar fed to the t embedder differs
  (`MDLMFamilyDiT`). Small size (`configs/model/small.yaml`): d 768, c 128, 12 blocks, 12 heads, L 1,024.
* Vocabulary. MDLM/SDTT: GPT-2's 50,257 ids plus the mask at 50,257 (`mask_index = tokenizer.vocab_size`),
  V_in = 50,258; SUBS parameterisation: the mask logit gets -10^6 (never drawn) and unmasked positions are copied.
  We drop the mask row of the output layer (exactly the SUBS softmax over the 50,257 tokens) and keep the embedding
  row as our mask source's id V; our mask-source sampler never moves an unmasked position (the copy).
  Duo: `len(tokenizer)` = 50,258, GPT-2 plus the `[PAD]` token `get_tokenizer` adds at 50,257; its uniform prior
  and noise range over all 50,258 (`prior_sample`, `q_xt`). We drop the `[PAD]` output row (renormalising over the
  50,257 real tokens) and sample with our uniform source over 50,257: the network is theirs exactly, the noise
  law differs by that one state (a 2e-5 relative change of the per-token jump mass); [PAD] is never drawn.
* Time. Their t runs from data (0) to noise (1); ours from source (0) to data (1): t_theirs = 1 - t. MDLM OWT and
  the SDTT students were trained with `time_conditioning: False` (`_process_sigma` zeroes sigma): the network
  reads sigma = 0 at every t. Duo (`time_conditioning: True`) reads sigma = -log alpha_t, alpha_t the keep
  probability of the uniform-state marginal; at sampling the log-linear alpha_t = 1 - (1 - eps) t_theirs,
  eps = 1e-3, i.e. alpha = eps + (1 - eps) t in our time (the DCD student reads the same quantity).
* Containers. Lightning `.ckpt`: {"state_dict": the LightningModule's (`backbone.`-prefixed names; SDTT students
  distilled from the HF teacher hold `backbone.backbone.`), "ema": {"decay", "num_updates", "shadow_params": one
  tensor per `backbone.parameters()` in registration order (the noise module has none)}, ...}; their evaluation
  copies the EMA in (`eval.disable_ema: False`). Those files also pickle configs and tokenizers, which
  torch.load(weights_only=True) refuses: extract {"state_dict", "ema"} once where the authors' code runs.
  Hugging Face: `model.safetensors` with `backbone.`-prefixed names (kuleshov-group/mdlm-owt's `MDLM.backbone`;
  jdeschena/sdtt revisions `baselines_kld_step_70000` = round 7, pushed by PyTorchModelHubMixin after renaming to
  `backbone.`; s-sahoo/duo and s-sahoo/duo-distilled follow the MDLM template), beside a config.json whose
  `time_conditioning` is checked when present. Bare names (no prefix) load too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fsdfm.model import DiT, ModelConfig, Rotary
from fsdfm.released_checkpoints import (
    ROTARY_BUFFER,
    CheckpointError,
    CheckpointNotFoundError,
    LoadedCheckpoint,
    Mismatch,
    mismatch_error,
    read_checkpoint,
    rotary_inv_freq,
    strip_wrapper_prefixes,
)

# our name (regex, matched in full) -> theirs (an `re` template); all one to one
NAME_MAP: tuple[tuple[str, str], ...] = (
    (r"tok_emb\.weight", "vocab_embed.embedding"),
    (r"t_emb\.mlp\.([02])\.(weight|bias)", r"sigma_map.mlp.\1.\2"),
    (r"blocks\.(\d+)\.qkv\.weight", r"blocks.\1.attn_qkv.weight"),
    (r"blocks\.(\d+)\.(norm[12]\.weight|attn_out\.weight|mlp\.[02]\.(?:weight|bias))", r"blocks.\1.\2"),
    (r"blocks\.(\d+)\.adaLN\.(weight|bias)", r"blocks.\1.adaLN_modulation.\2"),
    (r"norm_out\.weight", "output_layer.norm_final.weight"),
    (r"adaLN_out\.(weight|bias)", r"output_layer.adaLN_modulation.\1"),
    (r"head\.(weight|bias)", r"output_layer.linear.\1"),
)
_NAME_MAP = tuple((re.compile(ours), theirs) for ours, theirs in NAME_MAP)
BLOCK_PARAMS = (
    "norm1.weight",
    "attn_qkv.weight",
    "attn_out.weight",
    "norm2.weight",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "adaLN_modulation.weight",
    "adaLN_modulation.bias",
)
PREFIX = "backbone."
DUO_EPS = 1e-3  # s-sahoo/duo configs/noise/log-linear.yaml
WHICH = ("auto", "ema", "weights")


@dataclass(frozen=True)
class Family:
    """source: the suite's source it samples with; time_input: what the network reads ("zero": sigma = 0;
    "log_alpha": -log(eps + (1 - eps) t)); extra_rows: allowed V_in - V; time_conditioning: their config flag."""

    name: str
    source: str
    time_input: str
    extra_rows: tuple[int, ...]
    time_conditioning: bool


# Named after the process (the Duo paper's terms): a masked diffusion LM, a uniform-state diffusion model.
FAMILIES = {
    "mdlm": Family("mdlm", "mask", "zero", (1,), False),  # MDLM OWT and the SDTT students: mask row at V
    "usdm": Family("usdm", "uniform", "log_alpha", (0, 1), True),  # Duo and Duo+DCD: [PAD] row at V (GPT-2)
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def mdlm_config(**overrides) -> ModelConfig:
    """The small MDLM/SDTT/Duo backbone: GPT-2 (+ one row), L 1,024, d 768, c 128, 12 blocks of 12 heads."""
    base = dict(vocab_size=50257, input_vocab_size=50258, seq_len=1024, hidden=768, cond_dim=128, n_blocks=12)
    return ModelConfig(**{**base, "n_heads": 12, "t_scale": 1.0, "norm_weight": True, "norm_eps": 1e-5, **overrides})


def time_input(kind: str, t: torch.Tensor) -> torch.Tensor:
    """(B,) our t -> (B,) the sigma their network reads: 0 ("zero"), or -log(eps + (1 - eps) t) ("log_alpha")."""
    if kind == "zero":
        return torch.zeros_like(t, dtype=torch.float32)
    return -torch.log(DUO_EPS + (1.0 - DUO_EPS) * t.float())


class MDLMFamilyDiT(DiT):
    """Our DiT reading their time input: c = silu(t_emb(sigma(t))) (see `time_input`); never step-size
    conditioned. Everything else is `DiT`'s forward."""

    def __init__(self, cfg: ModelConfig, time_kind: str):
        super().__init__(cfg)
        self.time_kind = time_kind

    def condition(self, t: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        return F.silu(self.t_emb(time_input(self.time_kind, t)))


def their_name(our_name: str) -> str:
    for pattern, template in _NAME_MAP:
        if m := pattern.fullmatch(our_name):
            return m.expand(template)
    raise KeyError(f"no entry in fsdfm.released_mdlm.NAME_MAP for our parameter {our_name!r}")


def their_parameter_order(cfg: ModelConfig) -> list[str]:
    """Their `backbone.parameters()` order (module registration order), which indexes `ema.shadow_params`."""
    head = ["vocab_embed.embedding", *(f"sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))]
    blocks = [f"blocks.{b}.{p}" for b in range(cfg.n_blocks) for p in BLOCK_PARAMS]
    out = [f"output_layer.{p}" for p in ("norm_final.weight", "linear.weight", "linear.bias")]
    return head + blocks + out + [f"output_layer.adaLN_modulation.{p}" for p in ("weight", "bias")]


def their_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Their name -> shape for `cfg` (output rows: input_vocab_size), from our DiT on the meta device."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    out = {their_name(k): s for k, s in ours.items()}
    for name in ("output_layer.linear.weight", "output_layer.linear.bias"):
        out[name] = (cfg.input_vocab_size, *out[name][1:])
    return out


def normalize_names(sd: dict) -> dict:
    """Drop `module.` / `_orig_mod.` wrappers and any number of leading `backbone.` (Lightning, HF, SDTT)."""
    out = {}
    for name, value in strip_wrapper_prefixes(sd).items():
        while name.startswith(PREFIX):
            name = name[len(PREFIX) :]
        out[name] = value
    return out


def convert_state_dict(their_sd: dict, cfg: ModelConfig, where: str = "state dict") -> dict[str, torch.Tensor]:
    """Their names (any container prefix) -> our state dict for DiT(cfg); the output rows past cfg.vocab_size
    (the mask or [PAD] row) are dropped. Every mismatch is collected, then one CheckpointError lists them."""
    theirs = normalize_names(their_sd)
    problems = [
        Mismatch(k, "not a tensor", None, None, f"a {type(v).__name__}")
        for k, v in theirs.items()
        if not isinstance(v, torch.Tensor)
    ]
    tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
    want = their_shapes(cfg)
    for name, shape in want.items():
        got = tensors.get(name)
        if got is None:
            problems.append(Mismatch(name, "missing", shape, None))
        elif tuple(got.shape) != shape:
            problems.append(Mismatch(name, "wrong shape", shape, tuple(got.shape)))
    if ROTARY_BUFFER in tensors:
        ref, got = rotary_inv_freq(cfg), tensors[ROTARY_BUFFER]
        if got.shape != ref.shape:
            problems.append(Mismatch(ROTARY_BUFFER, "wrong shape", tuple(ref.shape), tuple(got.shape), "head size"))
        elif not torch.allclose(got.float(), ref, rtol=1e-5, atol=0.0):
            problems.append(Mismatch(ROTARY_BUFFER, "wrong value", tuple(ref.shape), tuple(got.shape), "not base 1e4"))
    problems += [
        Mismatch(k, "unexpected", None, tuple(v.shape))
        for k, v in tensors.items()
        if k not in want and k != ROTARY_BUFFER
    ]
    if problems:
        raise mismatch_error(where, cfg, problems)
    with torch.device("meta"):
        names = list(DiT(cfg).state_dict())
    ours = {k: tensors[their_name(k)] for k in names}
    ours["head.weight"] = ours["head.weight"][: cfg.vocab_size]
    ours["head.bias"] = ours["head.bias"][: cfg.vocab_size]
    return ours


def infer_config(their_sd: dict, fam: Family, vocab_size: int | None = None, **overrides) -> ModelConfig:
    """`mdlm_config` with the sizes read off their shapes; V = vocab_size (the corpus's) or V_in - 1 (GPT-2)."""
    sd = {k: v for k, v in normalize_names(their_sd).items() if isinstance(v, torch.Tensor)}
    sizes: dict[str, int] = {}
    if (w := sd.get("vocab_embed.embedding")) is not None and w.ndim == 2:
        v = w.shape[0] - 1 if vocab_size is None else vocab_size
        if w.shape[0] - v not in fam.extra_rows:
            raise CheckpointError(
                f"vocab_embed.embedding has {w.shape[0]} rows; a {fam.name} checkpoint for V = {v} tokens has "
                f"{' or '.join(str(v + r) for r in fam.extra_rows)} (the {fam.name} layout: "
                f"{'the mask row at V' if fam.name == 'mdlm' else 'optionally a [PAD] row at V'})"
            )
        sizes.update(vocab_size=v, input_vocab_size=w.shape[0], hidden=w.shape[1])
    if (w := sd.get("sigma_map.mlp.2.weight")) is not None and w.ndim == 2:
        sizes["cond_dim"] = w.shape[0]
    if blocks := [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]:
        sizes["n_blocks"] = max(blocks) + 1
    hidden = sizes.get("hidden", 768)
    if (w := sd.get("blocks.0.mlp.0.weight")) is not None and w.ndim == 2 and w.shape[0] % hidden == 0:
        sizes["mlp_ratio"] = w.shape[0] // hidden
    if (w := sd.get(ROTARY_BUFFER)) is not None and w.ndim == 1 and w.numel() and hidden % (2 * w.numel()) == 0:
        sizes["n_heads"] = hidden // (2 * w.numel())
    try:
        return mdlm_config(**{**sizes, **overrides})
    except ValueError as err:
        raise CheckpointError(f"the shapes in this state dict give no valid DiT config: {err}") from err


def read_container(path: Path) -> dict:
    """{"weights": named tensors, "ema": the Lightning EMA dict (optional)} from .safetensors or a torch file."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {"weights": load_file(str(path))}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    try:
        obj = read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. A Lightning .ckpt of the authors' code also pickles its config and tokenizer: extract the "
            "weights once where that code runs, torch.save({'state_dict': c['state_dict'], 'ema': c['ema']}, "
            "'weights.ckpt'), or use the Hugging Face model.safetensors"
        ) from err
    if isinstance(obj.get("state_dict"), dict):
        return {"weights": obj["state_dict"], **({"ema": obj["ema"]} if "ema" in obj else {})}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"weights": obj}
    raise CheckpointError(f"{path}: no 'state_dict' entry and not a flat state dict; top-level keys: {list(obj)[:20]}")


def ema_state_dict(ema: object, cfg: ModelConfig, where: str) -> dict:
    """Their `ema.shadow_params` (a list in `their_parameter_order`) as named tensors, the rotary buffer absent."""
    params = ema.get("shadow_params") if isinstance(ema, dict) else None
    order = their_parameter_order(cfg)
    if not isinstance(params, (list, tuple)) or len(params) != len(order):
        got = (len(params),) if isinstance(params, (list, tuple)) else None
        raise mismatch_error(
            f"{where} [ema]",
            cfg,
            [Mismatch("ema.shadow_params", "wrong shape", (len(order),), got, "one tensor per backbone parameter")],
        )
    return dict(zip(order, params))


def check_hf_config(path: Path, fam: Family) -> None:
    """A config.json beside a .safetensors file (the HF layout) must agree on `time_conditioning` when it says."""
    cfg_file = path.with_name("config.json")
    if path.suffix != ".safetensors" or not cfg_file.is_file():
        return
    flag = json.loads(cfg_file.read_text()).get("time_conditioning")
    if flag is not None and bool(flag) != fam.time_conditioning:
        raise CheckpointError(
            f"{cfg_file}: time_conditioning={flag}, but family {fam.name!r} expects {fam.time_conditioning} "
            f"({'sigma = 0 at every t' if fam.name == 'mdlm' else 'sigma = -log alpha_t'}): wrong family?"
        )


def load_mdlm_family(
    path: str | Path,
    family_name: str,
    which: str = "auto",
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    config: ModelConfig | None = None,
) -> LoadedCheckpoint:
    """Load a MDLM / SDTT ("mdlm") or Duo / DCD ("usdm") checkpoint into `MDLMFamilyDiT`.

    which: "ema" (the Lightning EMA copy), "weights" (the state dict, or the only weights of a safetensors file)
        or "auto" (EMA when the file has one). vocab_size: the real tokens V (the corpus's; None: V_in - 1).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    fam, path = family(family_name), Path(path)
    box = read_container(path)
    check_hf_config(path, fam)
    cfg = config if config is not None else infer_config(box["weights"], fam, vocab_size)
    key = "ema" if which == "ema" or (which == "auto" and "ema" in box) else "weights"
    if key == "ema" and "ema" not in box:
        raise CheckpointError(f"{path}: which='ema', but the file holds no 'ema' entry (keys: weights only)")
    their = ema_state_dict(box["ema"], cfg, str(path)) if key == "ema" else box["weights"]
    ours = convert_state_dict(their, cfg, where=f"{path} [{key!r}]")
    with torch.device("meta"):
        model = MDLMFamilyDiT(cfg, fam.time_input)
    model.to_empty(device=device)
    model.load_state_dict(ours, strict=True)
    model.rotary = Rotary(cfg.hidden // cfg.n_heads, cfg.seq_len).to(device)  # to_empty left it uninitialised
    return LoadedCheckpoint(model=model.eval(), config=cfg, source_key=key, h_conditioned=False)
