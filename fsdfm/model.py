"""The DiT-style bidirectional transformer that predicts p_{1|t}(. | x_t) at every position.

    logits = f_theta(x_t, t[, h])        x_t: (B, L) ids, or (B, L, V) floats (FLM's continuous state)

* adaLN conditioning on a sinusoidal embedding of t (and, for the FS-DFM student, of the step size h,
  embedded as raw h or log2 h and added to the t embedding);
* rotary attention through `scaled_dot_product_attention` (non-causal);
* the adaLN modulations, the h embedding's last layer and the output head are zero-initialised, so a
  fresh student with a new h path computes exactly its teacher's function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fsdfm.registry import Registry

H_EMBEDDINGS = ("none", "raw", "log2")


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

    def __post_init__(self):
        if self.input_vocab_size is None:
            object.__setattr__(self, "input_vocab_size", self.vocab_size)
        for name in ("vocab_size", "seq_len", "hidden", "cond_dim", "n_blocks", "n_heads", "mlp_ratio"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_vocab_size < self.vocab_size:
            raise ValueError(f"model.input_vocab_size ({self.input_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2:
            raise ValueError(f"model.hidden ({self.hidden}) must split into n_heads ({self.n_heads}) heads of even size")
        if self.h_embedding not in H_EMBEDDINGS:
            raise ValueError(f"model.h_embedding must be one of {H_EMBEDDINGS}, got {self.h_embedding!r}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: Registry = Registry("model preset")
PRESETS.register("tiny", dict(hidden=128, cond_dim=64, n_blocks=4, n_heads=4))
PRESETS.register("small", dict(hidden=768, cond_dim=128, n_blocks=12, n_heads=12))  # ~170M with GPT-2 vocab
PRESETS.register("1.3b", dict(hidden=2048, cond_dim=256, n_blocks=21, n_heads=32))  # the released FS-DFM size


def model_config(preset: str, vocab_size: int, seq_len: int, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset ("tiny", "small", "1.3b") plus overrides."""
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, **{**PRESETS.get(preset), **overrides})


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


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated (shift, scale) and gated by the conditioning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d))
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        B, L, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
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
        self.norm_out = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(cfg.cond_dim, 2 * cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        for layer in (self.adaLN_out, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def h_features(self, h: torch.Tensor) -> torch.Tensor:
        """The scalar fed to the h embedder: raw h in [0, 1] or -log2 h in [0, K], both scaled to ~[0, 1000]."""
        if self.cfg.h_embedding == "log2":
            return -torch.log2(h.clamp_min(2.0**-20)) * 100.0
        return h * 1000.0

    def condition(self, t: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        c = self.t_emb(t * 1000.0)
        if self.h_emb is not None:
            if h is None:
                raise ValueError("this model is step-size conditioned (h_embedding="
                                 f"{self.cfg.h_embedding!r}); pass h")
            c = c + self.h_emb(self.h_features(h))
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
        shift, scale = self.adaLN_out(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(x), shift, scale))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def student_from_teacher(teacher: DiT, h_embedding: str = "log2") -> DiT:
    """A step-size-conditioned copy of `teacher`: same weights, fresh zero-output h path."""
    if h_embedding == "none":
        raise ValueError("a student needs an h embedding ('raw' or 'log2')")
    student = DiT(replace(teacher.cfg, h_embedding=h_embedding)).to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("h_emb.") for k in missing), (missing, unexpected)
    return student
