"""The evaluator language model that scores samples: any Hugging Face causal LM plus its tokenizer.

At paper scale this is `gpt2-large`; at small scale the suite's own reference AR model saved with
`save_pretrained`. The evaluator always runs in fp32 (a lower precision changes the perplexity).
`load_evaluator` fails fast with `EvaluatorError` instead of waiting on the hub: with HF_HUB_OFFLINE=1
(the suite's default) it only looks at local files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_TRUE = {"1", "true", "yes", "on"}


class EvaluatorError(RuntimeError):
    """The evaluator LM cannot be loaded or used; the message names the evaluator and what to do."""


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class Evaluator:
    """An HF causal LM (`model(input_ids, attention_mask).logits`: (B, L, V)) and its HF tokenizer."""

    model: Any
    tokenizer: Any
    name: str
    device: str = "cpu"

    def __post_init__(self) -> None:
        # fp32 and eval mode: scores must not depend on dropout or on reduced precision.
        self.model.to(device=self.device, dtype=torch.float32)
        self.model.eval()

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def pad(self, rows: list[list[int]], min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id rows -> (ids, mask), both (B, W) long on the evaluator's device, W = max(min_width, longest row):
        ids padded with EOS (0 without one; padded positions are masked, so any id serves), mask 1 at real tokens."""
        pad_id = self.eos_token_id if self.eos_token_id is not None else 0
        width = max(min_width, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head: the largest id + 1 the model can score."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_length(self) -> int | None:
        """The model's context length (n_positions / max_position_embeddings), or None if unbounded/unknown."""
        cfg = self.model.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def load_evaluator(name_or_path: str | os.PathLike, device: str = "cpu") -> Evaluator:
    """Load `AutoModelForCausalLM` + `AutoTokenizer` from a local directory or a cached hub name.

    Raises `EvaluatorError` (never a hub retry loop) when the directory is missing or the name is not
    cached while offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, only when loading

    name = str(name_or_path)
    path = Path(name).expanduser()
    looks_like_path = path.is_absolute() or name.startswith((".", "~"))
    if looks_like_path and not path.is_dir():
        raise EvaluatorError(f"evaluator {name!r}: directory {str(path)!r} does not exist")
    local = path.is_dir()
    offline = hub_offline()
    kwargs = {"local_files_only": True} if (local or offline) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if local else name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path) if local else name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if local:
            raise EvaluatorError(
                f"evaluator {name!r}: cannot load a causal LM + tokenizer from directory {str(path)!r} ({err})"
            ) from err
        if offline:
            raise EvaluatorError(
                f"evaluator {name!r} is not available offline (HF_HUB_OFFLINE=1): not a local directory and not in "
                f"the local HF cache; "
                f"pass a local path (a directory written by save_pretrained) or pre-download it"
            ) from err
        raise EvaluatorError(f"evaluator {name!r}: cannot be loaded from the Hugging Face hub ({err})") from err
    return Evaluator(model=model, tokenizer=tokenizer, name=name, device=device)


def check_evaluator_available(name_or_path: str | os.PathLike) -> None:
    """Raise `EvaluatorError` when `load_evaluator` would fail for want of files: a path that is not a directory
    with a config.json, or (offline) a hub name whose config.json is not in the local HF cache. Cheap (no model
    is loaded), so specs check it at load time instead of failing at the first evaluation stage."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvaluatorError(
                f"evaluator {name!r}: directory {str(path)!r} holds no config.json "
                f"(expected a directory written by save_pretrained)"
            )
        return
    if path.is_absolute() or name.startswith((".", "~")):
        raise EvaluatorError(f"evaluator {name!r}: directory {str(path)!r} does not exist")
    if not hub_offline():
        return  # the hub will be asked at evaluation time
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception as err:  # an invalid repo id (huggingface_hub's validation error)
        raise EvaluatorError(
            f"evaluator {name!r}: not a local directory and not a valid hub model id ({err})"
        ) from None
    if not isinstance(found, str):
        raise EvaluatorError(
            f"evaluator {name!r} is not available offline (HF_HUB_OFFLINE=1): not a local directory "
            f"and not in the local HF cache; pass a local path (a directory written by "
            f"save_pretrained) or pre-download it"
        )
