"""What a sample metric reads and returns: `MetricInputs` (the samples, texts, evaluator and settings, with the
intermediate results several metrics share cached once) and `MetricOutcome` (a value, the samples it saw, details
to record, per-sample columns).

The contract between `fsdfm.metrics.compute` (which builds the inputs and dispatches) and every registered sample
metric (`fsdfm.metrics.sample`, or a user's `@register_metric` function); knows no metric by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from fsdfm.metrics.diversity import EntropyResult, entropy
from fsdfm.metrics.evaluator import Evaluator
from fsdfm.metrics.texts import END_MARKERS, strip_end_markers

__all__ = ["MetricInputs", "MetricOutcome"]


@dataclass(frozen=True)
class MetricInputs:
    """Everything a sample metric may need; shared intermediate results are cached properties."""

    token_ids: torch.Tensor  # (N, L) LongTensor, validated
    texts: list[str] | None
    lengths: torch.Tensor | None = None  # (N,) L_i: sample i is token_ids[i, :L_i]; None: each fills its row
    evaluator: Evaluator | None = None
    references: list[str] | None = None
    mauve_featurizer: str = "minilm"
    mauve_num_buckets: int | str = "auto"
    mauve_seeds: int = 5
    self_bleu_subsample: int | None = 1000
    seed: int = 0
    batch_size: int = 8
    max_length: int | None = None
    end_markers: tuple = END_MARKERS
    train_tokens: torch.Tensor | None = None  # the training split's ids, (N_train, L) blocks in order (or a stream)

    @property
    def n(self) -> int:
        return self.token_ids.shape[0]

    def clean_texts(self, metric: str) -> list[str]:
        """The texts with end-of-text markers removed (the text metrics' convention)."""
        return strip_end_markers(self.need_texts(metric), self.end_markers)

    @cached_property
    def clean_references(self) -> list[str] | None:
        return None if self.references is None else strip_end_markers(self.references, self.end_markers)

    def need_texts(self, metric: str) -> list[str]:
        if self.texts is None:
            raise ValueError(f"metric {metric!r} needs the decoded texts (texts=None was passed)")
        return self.texts

    def need_train(self, metric: str) -> torch.Tensor:
        """The training split as one stream of ids (its blocks in order), for a metric that compares with it."""
        if self.train_tokens is None:
            raise ValueError(f"metric {metric!r} needs the training split's token ids (train_tokens=...)")
        return torch.as_tensor(self.train_tokens).reshape(-1).long()

    def need_evaluator(self, metric: str) -> Evaluator:
        if self.evaluator is None:
            raise ValueError(f"metric {metric!r} needs an evaluator LM (pass evaluator=load_evaluator(...))")
        return self.evaluator

    @cached_property
    def entropy(self) -> EntropyResult:
        return entropy(self.token_ids, self.lengths)


@dataclass(frozen=True)
class MetricOutcome:
    """One metric on one sample set: `value`, the `n_samples` it saw, `details` to record (JSON-ready) and
    per-sample columns (`per_sample`: column -> (N,) array, in sample order)."""

    value: float
    n_samples: int
    details: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)
