"""Sample-quality metrics: one file per family, one registry of names, one entry point.

`compute_metrics(token_ids, texts, names, ...)` computes any of the sample-based metrics in
`SAMPLE_METRICS` (dispatch through the registry, shared work such as the entropy computed once) and
returns {name: float}; `compute_metric_set` returns the same values with what each metric saw
(`MetricSet`: samples per metric, recorded details such as MAUVE's per-seed values, per-sample columns).
Text metrics (MAUVE, self-BLEU) see the texts with end-of-text markers removed (`fsdfm.metrics.texts`). Cost, likelihood, oracle and divergence metrics are recorded by the stages that
own them (see `fsdfm.metrics.registry.METRICS` for every name with its direction and unit).

Always evaluate real held-out text through the same pipeline (`data_reference`) and put it next to the
models, with `collapse_flags`, so that a low perplexity bought by repetition is visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fsdfm.metrics.diversity import (
    EntropyResult, SelfBleuResult, as_token_matrix, distinct_n, entropy, rep_n, rep_n_per_sample, self_bleu,
)
from fsdfm.metrics.divergence import PosDivergence, fit_slope, pos_divergence
from fsdfm.metrics.evaluator import Evaluator, EvaluatorError, load_evaluator
from fsdfm.metrics.mauve import FEATURIZERS, MauveResult, get_featurizer, mauve_score
from fsdfm.metrics.perplexity import PerplexityResult, gen_ppl, gen_ppl_seq_mean
from fsdfm.metrics.registry import METRICS, MetricInfo
from fsdfm.metrics.texts import END_MARKERS, convention, strip_end_markers
from fsdfm.metrics.timing import (
    CountingModel, PeakMemory, Timing, peak_memory, reset_peak_memory, timed, tokens_per_s,
)
from fsdfm.registry import Registry

__all__ = [
    "METRICS", "MetricInfo", "SAMPLE_METRICS", "MetricInputs", "MetricOutcome", "MetricSet", "compute_metrics",
    "compute_metric_set", "data_reference", "collapse_flags", "END_MARKERS", "strip_end_markers",
    "Evaluator", "EvaluatorError", "load_evaluator",
    "PerplexityResult", "gen_ppl", "gen_ppl_seq_mean",
    "EntropyResult", "SelfBleuResult", "entropy", "distinct_n", "rep_n", "self_bleu",
    "FEATURIZERS", "MauveResult", "get_featurizer", "mauve_score",
    "CountingModel", "PeakMemory", "Timing", "timed", "peak_memory", "reset_peak_memory", "tokens_per_s",
    "PosDivergence", "pos_divergence", "fit_slope",
    "ENTROPY_COLLAPSE_NATS", "REP_COLLAPSE_FACTOR", "REP_COLLAPSE_MARGIN",
]

# Where the metrics that are not computed from samples come from, by family (for a helpful error).
_RECORDED_BY = {
    "timing": "the sampling stage (fsdfm.metrics.timing: CountingModel / timed)",
    "likelihood": "the training / likelihood-evaluation stage",
    "divergence": "fsdfm.metrics.divergence.pos_divergence (needs teacher and student rollouts)",
    "oracle": "the oracle data source (known likelihood)",
}


@dataclass(frozen=True)
class MetricInputs:
    """Everything a sample metric may need; shared intermediate results are cached properties."""

    token_ids: torch.Tensor  # (N, L) LongTensor, validated
    texts: list[str] | None
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

    def need_evaluator(self, metric: str) -> Evaluator:
        if self.evaluator is None:
            raise ValueError(f"metric {metric!r} needs an evaluator LM (pass evaluator=load_evaluator(...))")
        return self.evaluator

    @cached_property
    def entropy(self) -> EntropyResult:
        return entropy(self.token_ids)


@dataclass(frozen=True)
class MetricOutcome:
    """One metric on one sample set: `value`, the `n_samples` it saw, `details` to record (JSON-ready) and
    per-sample columns (`per_sample`: column -> (N,) array, in sample order)."""

    value: float
    n_samples: int
    details: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)


SAMPLE_METRICS: Registry[Callable[[MetricInputs], MetricOutcome]] = Registry("sample metric")


def _ppl_outcome(result: PerplexityResult, prefix: str) -> MetricOutcome:
    return MetricOutcome(
        result.value, result.n_samples,
        details={"n_tokens": result.n_tokens, "n_truncated": result.n_truncated, "nll_sum": result.nll_sum},
        per_sample={f"{prefix}nll": result.sample_nll, f"{prefix}n_tokens": result.sample_tokens,
                    f"{prefix}truncated": result.sample_truncated},
    )


@SAMPLE_METRICS.register("gen_ppl")
def _gen_ppl(x: MetricInputs) -> MetricOutcome:
    texts, evaluator = x.need_texts("gen_ppl"), x.need_evaluator("gen_ppl")
    result = gen_ppl(texts, evaluator, batch_size=x.batch_size, max_length=x.max_length)
    return _ppl_outcome(result, "")


@SAMPLE_METRICS.register("gen_ppl_seq_mean")
def _gen_ppl_seq_mean(x: MetricInputs) -> MetricOutcome:
    result = gen_ppl_seq_mean(x.token_ids, x.need_evaluator("gen_ppl_seq_mean"), batch_size=x.batch_size)
    out = _ppl_outcome(result, "seq_")
    return MetricOutcome(out.value, out.n_samples, out.details,
                         {k: v for k, v in out.per_sample.items() if k != "seq_truncated"})


@SAMPLE_METRICS.register("entropy_nats")
def _entropy_nats(x: MetricInputs) -> MetricOutcome:
    return MetricOutcome(x.entropy.nats, x.entropy.n_samples, per_sample={"entropy_nats": x.entropy.per_sample})


SAMPLE_METRICS.register("entropy_bits", lambda x: MetricOutcome(x.entropy.bits, x.entropy.n_samples))
for _n in range(1, 5):
    SAMPLE_METRICS.register(f"distinct_{_n}", lambda x, _n=_n: MetricOutcome(distinct_n(x.token_ids, _n), x.n))


@SAMPLE_METRICS.register("rep_n")
def _rep_n(x: MetricInputs) -> MetricOutcome:
    per_sample = rep_n_per_sample(x.token_ids, 4)
    return MetricOutcome(float(per_sample.mean()), len(per_sample), per_sample={"rep_n": per_sample})


@SAMPLE_METRICS.register("self_bleu")
def _self_bleu(x: MetricInputs) -> MetricOutcome:
    result = self_bleu(x.clean_texts("self_bleu"), n_subsample=x.self_bleu_subsample, seed=x.seed)
    return MetricOutcome(result.value, result.n_samples,
                         details={"n_hypotheses": result.n_hypotheses, "seed": result.seed,
                                  "text_convention": convention(x.end_markers)})


@SAMPLE_METRICS.register("mauve")
def _mauve(x: MetricInputs) -> MetricOutcome:
    if x.references is None:
        raise ValueError(f"metric 'mauve' needs references: {x.n} held-out real texts (references=None was passed)")
    result = mauve_score(
        x.clean_texts("mauve"), x.clean_references, featurizer=x.mauve_featurizer, num_buckets=x.mauve_num_buckets,
        seed=x.seed, evaluator=x.evaluator, device=x.evaluator.device if x.evaluator is not None else "cpu",
        n_seeds=x.mauve_seeds,
    )
    return MetricOutcome(result.value, result.n, details={**result.record(), "text_convention": convention(x.end_markers)})


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
            raise ValueError(
                f"metric {name!r} is not computed from samples; it is recorded by {_RECORDED_BY[info.family]}"
            )
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
) -> MetricSet:
    """Compute the sample metrics `names` on N samples, with what each saw (see `compute_metrics`)."""
    names = _check_names(names)
    ids = as_token_matrix(token_ids, "compute_metrics: token_ids", min_len=2)
    if texts is not None:
        texts = list(texts)
        if len(texts) != ids.shape[0]:
            raise ValueError(f"compute_metrics: {len(texts)} texts for {ids.shape[0]} token sequences; they must match")
    inputs = MetricInputs(
        token_ids=ids, texts=texts, evaluator=evaluator,
        references=list(references) if references is not None else None,
        mauve_featurizer=mauve_featurizer, mauve_num_buckets=mauve_num_buckets, mauve_seeds=mauve_seeds,
        self_bleu_subsample=self_bleu_subsample, seed=seed, batch_size=batch_size, max_length=max_length,
        end_markers=tuple(end_markers),
    )
    values, n_samples, details, per_sample = {}, {}, {}, {}
    from fsdfm.progress import bar as progress_bar
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
    references: N held-out real texts of the same length (needed by mauve).
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


# Collapse thresholds (absolute, so they read the same on every corpus):
# * entropy: more than 0.3 nats below the data's per-sample unigram entropy (~ a quarter fewer effective
#   distinct tokens per sample, exp(-0.3) = 0.74), beyond seed-to-seed noise at N >= 100;
# * repetition: rep_n above max(2 x data, data + 0.1): twice the data's within-sample 4-gram repetition,
#   and at least 10 points above it so near-zero data values do not flag tiny absolute changes.
ENTROPY_COLLAPSE_NATS = 0.3
REP_COLLAPSE_FACTOR = 2.0
REP_COLLAPSE_MARGIN = 0.1


def collapse_flags(metrics: dict[str, float], data_metrics: dict[str, float]) -> dict[str, bool]:
    """Flag mode collapse relative to the data reference row.

    collapse_entropy: entropy_nats < data entropy_nats - ENTROPY_COLLAPSE_NATS
    collapse_rep:     rep_n > max(REP_COLLAPSE_FACTOR * data rep_n, data rep_n + REP_COLLAPSE_MARGIN)
    A flag is present only when both rows have its metric.
    """
    flags: dict[str, bool] = {}
    if "entropy_nats" in metrics and "entropy_nats" in data_metrics:
        flags["collapse_entropy"] = metrics["entropy_nats"] < data_metrics["entropy_nats"] - ENTROPY_COLLAPSE_NATS
    if "rep_n" in metrics and "rep_n" in data_metrics:
        data_rep = data_metrics["rep_n"]
        flags["collapse_rep"] = metrics["rep_n"] > max(REP_COLLAPSE_FACTOR * data_rep, data_rep + REP_COLLAPSE_MARGIN)
    return flags
