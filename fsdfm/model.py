"""The DiT-style bidirectional transformer that predicts p_{1|t}(. | x_t) at every position.

    logits = f_theta(x_t, t[, h])        x_t: (B, L) ids, or (B, L, V) floats (FLM's continuous state)

* adaLN conditioning on a sinusoidal embedding of t (and, for the FS-DFM student, of the step size h,
  embedded as raw h or log2 h and added to the t embedding);
* rotary attention through `scaled_dot_product_attention` (non-causal);
* the adaLN modulations, the h embedding's last layer and the output head are zero-initialised, so a
  fresh student with a new h path computes exactly its teacher's function.

Options whose defaults give the behaviour above, set otherwise by `released_config` to reproduce the
released apple/ml-fs-dfm 1.3B checkpoints (see fsdfm/released_checkpoints.py):

* `t_scale`: t (and raw h) are multiplied by it before the sinusoidal features (1000, the DiT habit; 1 there);
* `norm_weight`, `norm_eps`: LayerNorms with a learned per-channel scale (no bias) and their eps;
* `h_fusion="concat"`: instead of adding the h embedding to the t embedding,
      c   = silu(W_f [e_t ; e_h] + b_f)            (B, 2 cond_dim)
      c_b = silu(W_b c + b_b)                       (B, cond_dim), one fuser per block and one for the head
  so every block (and the head) reads its own projection of the fused condition.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fsdfm.registry import Registry

H_EMBEDDINGS = ("none", "raw", "log2")
H_FUSIONS = ("add", "concat")


@dataclass(frozen=True)
class ModelConfig:
    """Size and conditioning of the DiT. vocab_size: output classes V; input_vocab_size: embedding rows
    (V + 1 for the mask source)."""

    vocab_size: int
    seq_len: int
    input_vocab_size: int | None = None
    hidden: int = 128
    cond_dim: int = 64
    n_blocks: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    h_embedding: str = "none"
    t_scale: float = 1000.0  # t (and raw h) scaled by this before the sinusoidal features
    norm_weight: bool = False  # LayerNorms carry a learned per-channel scale (never a bias)
    norm_eps: float = 1e-6
    h_fusion: str = "add"  # "add": c = silu(e_t + e_h); "concat": fused, then re-projected per block

    def __post_init__(self):
        if self.input_vocab_size is None:
            object.__setattr__(self, "input_vocab_size", self.vocab_size)
        for name in ("vocab_size", "seq_len", "hidden", "cond_dim", "n_blocks", "n_heads", "mlp_ratio"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_vocab_size < self.vocab_size:
            raise ValueError(f"model.input_vocab_size ({self.input_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2:
            raise ValueError(
                f"model.hidden ({self.hidden}) must split into n_heads ({self.n_heads}) heads of even size"
            )
        if self.h_embedding not in H_EMBEDDINGS:
            raise ValueError(f"model.h_embedding must be one of {H_EMBEDDINGS}, got {self.h_embedding!r}")
        if self.h_fusion not in H_FUSIONS:
            raise ValueError(f"model.h_fusion must be one of {H_FUSIONS}, got {self.h_fusion!r}")
        for name in ("t_scale", "norm_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"model.{name} must be a positive finite number, got {getattr(self, name)!r}")

    @property
    def fused_condition(self) -> bool:
        """True when h is concatenated with t and every block/head re-projects the (B, 2 cond_dim) condition."""
        return self.h_embedding != "none" and self.h_fusion == "concat"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: Registry = Registry("model preset")
PRESETS.register("tiny", dict(hidden=128, cond_dim=64, n_blocks=4, n_heads=4))
PRESETS.register("small", dict(hidden=768, cond_dim=128, n_blocks=12, n_heads=12))  # ~170M with GPT-2 vocab
PRESETS.register("1.3b", dict(hidden=2048, cond_dim=256, n_blocks=21, n_heads=32))  # the released FS-DFM size


def model_config(preset: str, vocab_size: int, seq_len: int, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset ("tiny", "small", "1.3b") plus overrides."""
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, **{**PRESETS.get(preset), **overrides})


# The architecture of the released apple/ml-fs-dfm 1.3B checkpoints (facts and sources: fsdfm/released_checkpoints.py):
# GPT-2 vocabulary (50,257, uniform source: no mask row), 1,024 tokens, width 2048, cond 256, 21 blocks of
# 32 heads, MLP ratio 4; t and h enter unscaled; LayerNorms with a weight, eps 1e-5; h fused by concatenation.
RELEASED_ARCHITECTURE = dict(
    vocab_size=50257,
    seq_len=1024,
    hidden=2048,
    cond_dim=256,
    n_blocks=21,
    n_heads=32,
    mlp_ratio=4,
    t_scale=1.0,
    norm_weight=True,
    norm_eps=1e-5,
    h_fusion="concat",
)
RELEASED: Registry = Registry("released checkpoint kind")
RELEASED.register("dfm", dict(h_embedding="none"))  # the DFM teacher: f(x_t, t)
RELEASED.register("fsdfm", dict(h_embedding="raw"))  # the FS-DFM student: f(x_t, t, h), h the raw step size


def released_config(kind: str = "fsdfm", **overrides) -> ModelConfig:
    """The ModelConfig of a released 1.3B checkpoint: kind "fsdfm" (student, h-conditioned) or "dfm" (teacher)."""
    return ModelConfig(**{**RELEASED_ARCHITECTURE, **RELEASED.get(kind), **overrides})


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [cos(x w_k), sin(x w_k)] with w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar (scaled to ~[0, 1000], as DiT does for t) -> MLP -> cond_dim."""

    def __init__(self, cond_dim: int, freq_dim: int = 256, zero_out: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        if zero_out:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(x, self.freq_dim))


class Rotary(nn.Module):
    """Rotary position embedding tables for head size d (cos/sin cached up to seq_len)."""

    def __init__(self, head_dim: int, seq_len: int, base: float = 10_000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # (L, d/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, d) -> rotated, rotating pairs (x[..., :d/2], x[..., d/2:])."""
        L = x.shape[-2]
        cos, sin = self.cos[:L].to(x.dtype), self.sin[:L].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """LayerNorm over the width: plain (default) or with a learned per-channel scale (cfg.norm_weight)."""
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, elementwise_affine=cfg.norm_weight, bias=False)


def condition_fuser(cfg: ModelConfig) -> nn.Linear | None:
    """(B, 2 cond_dim) fused condition -> (B, cond_dim) for one block or the head; None unless h is concatenated."""
    return nn.Linear(2 * cfg.cond_dim, cfg.cond_dim) if cfg.fused_condition else None


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated (shift, scale) and gated by the conditioning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden
        self.n_heads = cfg.n_heads
        self.norm1 = layer_norm(cfg)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = layer_norm(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        self.cond_fuser = condition_fuser(cfg)
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        B, L, d = x.shape
        if self.cond_fuser is not None:
            c = F.silu(self.cond_fuser(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        q, k, v = (
            self.qkv(modulate(self.norm1(x), shift1, scale1))
            .view(B, L, 3, self.n_heads, d // self.n_heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(rotary(q), rotary(k), v)  # bidirectional: no mask
        x = x + gate1[:, None] * self.attn_out(a.transpose(1, 2).reshape(B, L, d))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """f_theta(x_t, t, h) -> logits over the V data tokens; x_t (B, L) long or (B, L, V) float; t, h (B,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.input_vocab_size, cfg.hidden)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.t_emb = ScalarEmbedder(cfg.cond_dim)
        # The h path starts at zero so a student initialised from its teacher reproduces it exactly.
        self.h_emb = ScalarEmbedder(cfg.cond_dim, zero_out=True) if cfg.h_embedding != "none" else None
        self.rotary = Rotary(cfg.hidden // cfg.n_heads, cfg.seq_len)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_blocks))
        # With h_fusion="concat": t and h embeddings concatenated and mixed, (B, 2 cond_dim) -> (B, 2 cond_dim).
        self.cond_fuser = nn.Linear(2 * cfg.cond_dim, 2 * cfg.cond_dim) if cfg.fused_condition else None
        self.norm_out = layer_norm(cfg)
        self.cond_fuser_out = condition_fuser(cfg)
        self.adaLN_out = nn.Linear(cfg.cond_dim, 2 * cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        for layer in (self.adaLN_out, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def h_features(self, h: torch.Tensor) -> torch.Tensor:
        """The scalar fed to the h embedder: raw h in [0, 1] scaled by t_scale (~[0, 1000] by default), or
        -log2 h in [0, K] scaled by 100."""
        if self.cfg.h_embedding == "log2":
            return -torch.log2(h.clamp_min(2.0**-20)) * 100.0
        return h * self.cfg.t_scale

    def condition(self, t: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """(B,) t[, h] -> c: (B, cond_dim), or (B, 2 cond_dim) with h_fusion="concat" (re-projected per block)."""
        c = self.t_emb(t * self.cfg.t_scale)
        if self.h_emb is not None:
            if h is None:
                raise ValueError(f"this model is step-size conditioned (h_embedding={self.cfg.h_embedding!r}); pass h")
            e_h = self.h_emb(self.h_features(h))
            if self.cond_fuser is not None:
                return F.silu(self.cond_fuser(torch.cat([c, e_h], dim=-1)))
            c = c + e_h
        return F.silu(c)

    def embed(self, x_t: torch.Tensor) -> torch.Tensor:
        if x_t.is_floating_point():  # continuous state over the simplex (FLM): x . W_emb
            return x_t.to(self.tok_emb.weight.dtype) @ self.tok_emb.weight[: self.cfg.vocab_size]
        return self.tok_emb(x_t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        L = x_t.shape[1]
        if L > self.cfg.seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's seq_len {self.cfg.seq_len}")
        c = self.condition(t, h)
        x = self.embed(x_t)
        for block in self.blocks:
            x = block(x, c, self.rotary)
        if self.cond_fuser_out is not None:
            c = F.silu(self.cond_fuser_out(c))
        shift, scale = self.adaLN_out(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(x), shift, scale))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _is_h_path(name: str) -> bool:
    """Parameters that only a step-size-conditioned model has: the h embedder and the concat fusers."""
    parts = name.split(".")
    return parts[0] in ("h_emb", "cond_fuser", "cond_fuser_out") or (parts[0] == "blocks" and parts[2] == "cond_fuser")


def student_from_teacher(teacher: DiT, h_embedding: str = "log2") -> DiT:
    """A step-size-conditioned copy of `teacher`: same weights, fresh h path. With h_fusion="add" the h path
    outputs zero, so the student computes its teacher's function; with "concat" the fresh fusers change it."""
    if h_embedding == "none":
        raise ValueError("a student needs an h embedding ('raw' or 'log2')")
    student = DiT(replace(teacher.cfg, h_embedding=h_embedding)).to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(_is_h_path(k) for k in missing), (missing, unexpected)
    return student
