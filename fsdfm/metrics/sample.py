"""The metrics computed from samples: their registered functions and `compute_metrics`, the one entry point.

`compute_metrics(token_ids, texts, names, ...)` computes any of the sample-based metrics in
`SAMPLE_METRICS` (dispatch through `METRICS`, shared work such as the entropy computed once) and
returns {name: float}; `compute_metric_set` returns the same values with what each metric saw
(`MetricSet`: samples per metric, recorded details such as MAUVE's per-seed values, per-sample columns).
Text metrics (MAUVE, self-BLEU) see the texts with end-of-text markers removed (`fsdfm.metrics.texts`).

This module knows the metrics' inputs (`MetricInputs`) and how to dispatch them; it knows nothing about stages,
studies or the report. Cost, likelihood, divergence and the exact oracle metrics are recorded by the stages that
own them; the oracle corpus metrics are computed from the oracle source (`fsdfm.metrics.oracle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fsdfm.metrics.diversity import EntropyResult, as_lengths, as_token_matrix, distinct_n, entropy, rep_n_mean
from fsdfm.metrics.diversity import rep_n_per_sample, self_bleu
from fsdfm.metrics.evaluator import Evaluator
from fsdfm.metrics.mauve import mauve_score
from fsdfm.metrics.perplexity import PerplexityResult, gen_ppl, gen_ppl_seq_mean
from fsdfm.metrics.registry import METRICS, MetricInfo, register_metric
from fsdfm.metrics.texts import END_MARKERS, convention, strip_end_markers
from fsdfm.registry import UnknownNameError, did_you_mean

__all__ = [
    "SAMPLE_METRICS",
    "MetricInputs",
    "MetricOutcome",
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
        return entropy(self.token_ids, self.lengths)


@dataclass(frozen=True)
class MetricOutcome:
    """One metric on one sample set: `value`, the `n_samples` it saw, `details` to record (JSON-ready) and
    per-sample columns (`per_sample`: column -> (N,) array, in sample order)."""

    value: float
    n_samples: int
    details: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)


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


def _ppl_outcome(result: PerplexityResult, prefix: str) -> MetricOutcome:
    return MetricOutcome(
        result.value,
        result.n_samples,
        details={"n_tokens": result.n_tokens, "n_truncated": result.n_truncated, "nll_sum": result.nll_sum},
        per_sample={
            f"{prefix}nll": result.sample_nll,
            f"{prefix}n_tokens": result.sample_tokens,
            f"{prefix}truncated": result.sample_truncated,
        },
    )


@register_metric(
    "gen_ppl",
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("texts", "evaluator"),
    label="generative perplexity, token-pooled",
    show={"main": 1, "seeds": 1, "sweep": 1, "ablation": 1, "pairs": 1},
    description="token-pooled exp(sum NLL / sum tokens) of the re-tokenized decoded samples under the "
    "evaluator LM (fp32; first token unscored; non-EOS tokens plus the first EOS scored)",
)
def _gen_ppl(x: MetricInputs) -> MetricOutcome:
    texts, evaluator = x.need_texts("gen_ppl"), x.need_evaluator("gen_ppl")
    result = gen_ppl(texts, evaluator, batch_size=x.batch_size, max_length=x.max_length)
    return _ppl_outcome(result, "")


@register_metric(
    "gen_ppl_seq_mean",
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("evaluator",),
    label="perplexity, mean over samples",
    show={"main": 2, "pairs": 2},
    description="FS-DFM/SEDD convention: mean over samples of exp(mean NLL) on the raw ids (tokenizers must match)",
)
def _gen_ppl_seq_mean(x: MetricInputs) -> MetricOutcome:
    result = gen_ppl_seq_mean(x.token_ids, x.need_evaluator("gen_ppl_seq_mean"), x.batch_size, x.lengths)
    out = _ppl_outcome(result, "seq_")
    return MetricOutcome(
        out.value, out.n_samples, out.details, {k: v for k, v in out.per_sample.items() if k != "seq_truncated"}
    )


@register_metric(
    "entropy_nats",
    direction=None,
    unit="nats",
    family="diversity",
    target="data",
    label="unigram entropy per sample (nats)",
    show={"main": 3, "seeds": 2, "sweep": 2, "ablation": 2, "pairs": 3},
    description="per-sample unigram entropy of the token ids, averaged over samples",
)
def _entropy_nats(x: MetricInputs) -> MetricOutcome:
    return MetricOutcome(x.entropy.nats, x.entropy.n_samples, per_sample={"entropy_nats": x.entropy.per_sample})


@register_metric(
    "entropy_bits",
    direction=None,
    unit="bits",
    family="diversity",
    target="data",
    label="unigram entropy per sample (bits)",
    description="entropy_nats / ln 2",
)
def _entropy_bits(x: MetricInputs) -> MetricOutcome:
    return MetricOutcome(x.entropy.bits, x.entropy.n_samples)


# distinct-2 and distinct-4 are the main table's; distinct-4 is also a step-sweep panel
_DISTINCT_SHOW = {1: {}, 2: {"main": 5}, 3: {}, 4: {"main": 6, "sweep": 6}}
for _n in range(1, 5):
    register_metric(
        f"distinct_{_n}",
        direction="max",
        unit="fraction",
        family="diversity",
        target="data",
        show=_DISTINCT_SHOW[_n],
        description=f"unique {_n}-grams / total {_n}-grams, pooled over all samples",
    )(lambda x, _n=_n: MetricOutcome(distinct_n(x.token_ids, _n, x.lengths), x.n))


@register_metric(
    "rep_n",
    direction="min",
    unit="fraction",
    family="diversity",
    target="data",
    label="repeated 4-grams (fraction)",
    show={"main": 8, "seeds": 4, "sweep": 4, "ablation": 4, "pairs": 4},
    description="within-sample fraction of repeated 4-grams (1 - unique/total per sample), averaged over samples",
)
def _rep_n(x: MetricInputs) -> MetricOutcome:
    per_sample = rep_n_per_sample(x.token_ids, 4, x.lengths)  # NaN for a sample of < 4 ids: not seen, not counted
    return MetricOutcome(
        rep_n_mean(per_sample, 4), int(np.isfinite(per_sample).sum()), per_sample={"rep_n": per_sample}
    )


@register_metric(
    "self_bleu",
    direction="min",
    unit="BLEU",
    family="diversity",
    needs=("texts",),
    target="data",
    label="self-BLEU (0-100)",
    show={"main": 7, "sweep": 5},
    description="mean sacrebleu sentence BLEU-4 of each (subsampled, seeded) sample against all the other samples",
)
def _self_bleu(x: MetricInputs) -> MetricOutcome:
    result = self_bleu(x.clean_texts("self_bleu"), n_subsample=x.self_bleu_subsample, seed=x.seed)
    return MetricOutcome(
        result.value,
        result.n_samples,
        details={
            "n_hypotheses": result.n_hypotheses,
            "seed": result.seed,
            "text_convention": convention(x.end_markers),
        },
    )


@register_metric(
    "mauve",
    direction="max",
    unit="score",
    family="mauve",
    needs=("texts", "references"),
    label="MAUVE (0-1)",
    show={"main": 4, "seeds": 3, "sweep": 3, "ablation": 3, "pairs": 6},
    description="mauve-text on featurizer features between the samples and as many held-out real texts",
)
def _mauve(x: MetricInputs) -> MetricOutcome:
    if x.references is None:
        raise ValueError(f"metric 'mauve' needs references: {x.n} held-out real texts (references=None was passed)")
    result = mauve_score(
        x.clean_texts("mauve"),
        x.clean_references,
        featurizer=x.mauve_featurizer,
        num_buckets=x.mauve_num_buckets,
        seed=x.seed,
        evaluator=x.evaluator,
        device=x.evaluator.device if x.evaluator is not None else "cpu",
        n_seeds=x.mauve_seeds,
    )
    return MetricOutcome(
        result.value, result.n, details={**result.record(), "text_convention": convention(x.end_markers)}
    )


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
    lengths:   optional (N,) ints in [1, L]: sample i is token_ids[i, :lengths[i]], no metric sees the rest.
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
