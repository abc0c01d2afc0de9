"""`compute_metrics`, the one entry point of the sample metrics: checks the names and inputs, dispatches each
name through `METRICS` to its registered function, and gathers what each metric saw (`MetricSet`).

`compute_metrics(token_ids, texts, names, ...)` computes any of the sample-based metrics in `SAMPLE_METRICS` (the
`METRICS` entries with a function and no oracle need; shared work such as the entropy computed once, in
`MetricInputs`) and returns {name: float}; `compute_metric_set` returns the same values with what each metric saw
(samples per metric, recorded details such as MAUVE's per-seed values, per-sample columns). `data_reference` is the
same pipeline on real held-out text. Knows no metric by name and nothing about stages, studies or the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fsdfm.metrics.diversity import as_lengths, as_token_matrix
from fsdfm.metrics.evaluator import Evaluator
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome
from fsdfm.metrics.registry import METRICS, MetricInfo
from fsdfm.metrics.texts import END_MARKERS
from fsdfm.progress import bar as progress_bar
from fsdfm.registry import UnknownNameError, did_you_mean

__all__ = [
    "SAMPLE_METRICS",
    "MetricSet",
    "compute_metrics",
    "compute_metric_set",
    "data_reference",
    "data_reference_set",
]


def _recorded_by(info: MetricInfo) -> str:
    if info.recorded_by:
        return info.recorded_by
    if "oracle" in info.needs:
        return "the oracle data source (known likelihood)"
    return "a stage"


class _SampleMetrics:
    """The metrics computed from samples alone (`METRICS` entries with a function and no oracle need): a
    read-only view with the Registry's lookups (`name in SAMPLE_METRICS`, `.names()`, `.get(name)` -> function)."""

    kind = "sample metric"

    @staticmethod
    def _ok(name: str) -> bool:
        if name not in METRICS:
            return False
        info = METRICS.get(name)
        return info.computed and "oracle" not in info.needs

    def names(self) -> list[str]:
        return [n for n in METRICS.names() if self._ok(n)]

    def get(self, name: str) -> Callable[[MetricInputs], MetricOutcome]:
        if not self._ok(name):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; allowed: {', '.join(self.names())}"
            )
        return METRICS.get(name).compute

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._ok(name)

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


SAMPLE_METRICS = _SampleMetrics()


@dataclass(frozen=True)
class MetricSet:
    """`compute_metric_set`'s answer: `values` {name: float} in the order asked, `n_samples` {name: samples the
    metric saw}, `details` {name: recorded extras}, `per_sample` {column: (N,) array} over all metrics."""

    values: dict
    n_samples: dict
    details: dict
    per_sample: dict


def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise ValueError("compute_metrics: no metric names given")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"compute_metrics: metric names repeated: {duplicates}")
    for name in names:
        info = METRICS.get(name)  # unknown name -> UnknownNameError with did-you-mean
        if name not in SAMPLE_METRICS:
            raise ValueError(f"metric {name!r} is not computed from samples; it is recorded by {_recorded_by(info)}")
    return names


def compute_metric_set(
    token_ids,
    texts: Sequence[str] | None,
    names: Sequence[str],
    *,
    evaluator: Evaluator | None = None,
    references: Sequence[str] | None = None,
    mauve_featurizer: str = "minilm",
    mauve_num_buckets: int | str = "auto",
    mauve_seeds: int = 5,
    self_bleu_subsample: int | None = 1000,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    end_markers: Sequence[str] = END_MARKERS,
    lengths=None,
    train_tokens=None,
) -> MetricSet:
    """Compute the sample metrics `names` on N samples, with what each saw (see `compute_metrics`)."""
    names = _check_names(names)
    ids = as_token_matrix(token_ids, "compute_metrics: token_ids", min_len=2)
    lens = as_lengths(lengths, ids, "compute_metrics: lengths")
    if texts is not None:
        texts = list(texts)
        if len(texts) != ids.shape[0]:
            raise ValueError(f"compute_metrics: {len(texts)} texts for {ids.shape[0]} token sequences; they must match")
    inputs = MetricInputs(
        token_ids=ids,
        texts=texts,
        lengths=lens,
        evaluator=evaluator,
        references=list(references) if references is not None else None,
        mauve_featurizer=mauve_featurizer,
        mauve_num_buckets=mauve_num_buckets,
        mauve_seeds=mauve_seeds,
        self_bleu_subsample=self_bleu_subsample,
        seed=seed,
        batch_size=batch_size,
        max_length=max_length,
        end_markers=tuple(end_markers),
        train_tokens=train_tokens,
    )
    values, n_samples, details, per_sample = {}, {}, {}, {}
    bar = progress_bar(len(names), f"metrics of {ids.shape[0]} samples", unit="metric")
    for name in names:
        if bar is not None:
            bar.set_postfix_str(name)
        outcome = SAMPLE_METRICS.get(name)(inputs)
        if bar is not None:
            bar.update()
        value = float(outcome.value)
        if value != value:  # NaN: a bug upstream, never a reportable number
            raise FloatingPointError(f"metric {name!r} evaluated to NaN on {ids.shape[0]} samples")
        values[name] = value
        n_samples[name] = int(outcome.n_samples)
        if outcome.details:
            details[name] = dict(outcome.details)
        per_sample.update({k: np.asarray(v) for k, v in outcome.per_sample.items() if v is not None})
    if bar is not None:
        bar.close()
    return MetricSet(values=values, n_samples=n_samples, details=details, per_sample=per_sample)


def compute_metrics(token_ids, texts: Sequence[str] | None, names: Sequence[str], **kwargs: Any) -> dict[str, float]:
    """Compute the sample metrics `names` on N samples; returns {name: float} in the order asked.

    token_ids: (N, L) ids of the samples in the model's own tokenizer (N >= 1, L >= 2).
    texts:     the N decoded samples (needed by gen_ppl, self_bleu, mauve), in the same order.
    lengths:   optional (N,) ints in [1, L]: sample i is token_ids[i, :lengths[i]]; no metric sees the rest
               (texts of other lengths, `fsdfm eval`). None: every sample fills L.
    references: N held-out real texts of the same length (needed by mauve).
    train_tokens: the training split's ids, (N_train, L) blocks in order (needed by train_copy).
    Keyword settings as in `compute_metric_set` (mauve_featurizer, mauve_num_buckets, mauve_seeds (k-means
    seeds averaged, >= 5), self_bleu_subsample, seed, batch_size, max_length, end_markers).
    Raises a clear error on empty / too-short samples, a text count that differs from N, a missing input,
    or an unknown name; never returns NaN.
    """
    return compute_metric_set(token_ids, texts, names, **kwargs).values


def data_reference(token_ids, texts: Sequence[str] | None, names: Sequence[str], **kwargs: Any) -> dict[str, float]:
    """The data reference row: `compute_metrics` on real held-out text, same pipeline and settings.

    Names that are not computed from samples (nfe, wall_s, ...) are dropped, so a study's metric list can
    be passed unchanged. For mauve, pass as `references` a second, disjoint held-out set.
    """
    return data_reference_set(token_ids, texts, names, **kwargs).values


def data_reference_set(token_ids, texts: Sequence[str] | None, names: Sequence[str], **kwargs: Any) -> MetricSet:
    """`data_reference` with what each metric saw (`MetricSet`)."""
    return compute_metric_set(token_ids, texts, [n for n in names if n in SAMPLE_METRICS], **kwargs)
