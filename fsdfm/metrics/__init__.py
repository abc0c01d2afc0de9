"""Sample-quality metrics: one file per family, one registry entry per metric, one entry point.

`METRICS` (`fsdfm.metrics.registry`) holds one `MetricInfo` per metric: direction (or target "data"), unit,
family, what it needs, axis label, where the report shows it and, for metrics computed from samples, the
function (`@register_metric`). `compute_metrics(token_ids, texts, names, ...)` (`fsdfm.metrics.compute`)
computes any of the sample-based metrics in `SAMPLE_METRICS` and returns {name: float};
`compute_metric_set` returns the same values with what each metric saw. The oracle corpus metrics
(`extra_metrics`, `corpus_metric_names`: `fsdfm.metrics.oracle`) are computed from a synthetic corpus's
source. Cost, likelihood, divergence and posterior_kl are recorded by the stages that own them.

Importing this package registers every metric: the registry is complete whatever module is imported first.

Always evaluate real held-out text through the same pipeline (`data_reference`) and put it next to the
models, with `collapse_flags`, so that a low perplexity bought by repetition is visible.
"""

from __future__ import annotations

from fsdfm.metrics.diversity import EntropyResult, SelfBleuResult, distinct_n, entropy, rep_n, self_bleu
from fsdfm.metrics.divergence import PosDivergence, fit_slope, pos_divergence
from fsdfm.metrics.evaluator import Evaluator, EvaluatorError, load_evaluator
from fsdfm.metrics.mauve import FEATURIZERS, MauveResult, get_featurizer, mauve_score
from fsdfm.metrics.perplexity import PerplexityResult, gen_ppl, gen_ppl_seq_mean
from fsdfm.metrics.registry import (
    METRICS,
    MetricInfo,
    axis_label,
    data_target_metrics,
    register_metric,
    shown,
    unregister_metric,
)
from fsdfm.metrics.compute import (
    SAMPLE_METRICS,
    MetricSet,
    compute_metric_set,
    compute_metrics,
    data_reference,
    data_reference_set,
)
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome
from fsdfm.metrics import sample as _sample  # noqa: F401  (registers the built-in sample metrics)
from fsdfm.metrics.texts import END_MARKERS, strip_end_markers
from fsdfm.metrics.timing import (
    CountingModel,
    PeakMemory,
    Timing,
    peak_memory,
    reset_peak_memory,
    timed,
    tokens_per_s,
)
from fsdfm.metrics.oracle import corpus_metric_names, extra_metrics  # also registers the oracle metrics
from fsdfm.metrics import collapse as _collapse  # noqa: F401  (registers collapse_ngram and ngram_tv_text)
from fsdfm.metrics import protocol as _protocol  # noqa: F401  (registers the protocol-audit gen-PPL conventions)
from fsdfm.metrics import train_copy as _train_copy  # noqa: F401  (registers train_copy: memorisation)

__all__ = [
    "METRICS",
    "MetricInfo",
    "register_metric",
    "unregister_metric",
    "shown",
    "data_target_metrics",
    "axis_label",
    "SAMPLE_METRICS",
    "MetricInputs",
    "MetricOutcome",
    "MetricSet",
    "compute_metrics",
    "compute_metric_set",
    "data_reference",
    "data_reference_set",
    "collapse_flags",
    "END_MARKERS",
    "strip_end_markers",
    "extra_metrics",
    "corpus_metric_names",
    "Evaluator",
    "EvaluatorError",
    "load_evaluator",
    "PerplexityResult",
    "gen_ppl",
    "gen_ppl_seq_mean",
    "EntropyResult",
    "SelfBleuResult",
    "entropy",
    "distinct_n",
    "rep_n",
    "self_bleu",
    "FEATURIZERS",
    "MauveResult",
    "get_featurizer",
    "mauve_score",
    "CountingModel",
    "PeakMemory",
    "Timing",
    "timed",
    "peak_memory",
    "reset_peak_memory",
    "tokens_per_s",
    "PosDivergence",
    "pos_divergence",
    "fit_slope",
    "ENTROPY_COLLAPSE_NATS",
    "REP_COLLAPSE_FACTOR",
    "REP_COLLAPSE_MARGIN",
]

# Collapse thresholds (absolute, so they read the same on every corpus):
# * entropy: more than 0.3 nats below the data's per-sample unigram entropy (~ a quarter fewer effective
#   distinct tokens per sample, exp(-0.3) = 0.74), beyond seed-to-seed noise at N >= 100;
# * repetition: rep_n above max(2 x data, data + 0.1): twice the data's within-sample 4-gram repetition,
#   and at least 10 points above it so near-zero data values do not flag tiny absolute changes.
ENTROPY_COLLAPSE_NATS = 0.3
REP_COLLAPSE_FACTOR = 2.0
REP_COLLAPSE_MARGIN = 0.1


def collapse_flags(metrics: dict[str, float], data_metrics: dict[str, float]) -> dict[str, bool]:
    """Flag degenerate samples relative to the data reference row, on the side of the data they fall:

    collapse_entropy: entropy_nats < data entropy_nats - ENTROPY_COLLAPSE_NATS   (collapsed: too few distinct tokens)
    noise_entropy:    entropy_nats > data entropy_nats + ENTROPY_COLLAPSE_NATS   (noisy: near-uniform tokens; more
                      entropy than the data is noise, not collapse)
    collapse_rep:     rep_n > max(REP_COLLAPSE_FACTOR * data rep_n, data rep_n + REP_COLLAPSE_MARGIN)
    A flag is present only when both rows have its metric.
    """
    flags: dict[str, bool] = {}
    if "entropy_nats" in metrics and "entropy_nats" in data_metrics:
        flags["collapse_entropy"] = metrics["entropy_nats"] < data_metrics["entropy_nats"] - ENTROPY_COLLAPSE_NATS
        flags["noise_entropy"] = metrics["entropy_nats"] > data_metrics["entropy_nats"] + ENTROPY_COLLAPSE_NATS
    if "rep_n" in metrics and "rep_n" in data_metrics:
        data_rep = data_metrics["rep_n"]
        flags["collapse_rep"] = metrics["rep_n"] > max(REP_COLLAPSE_FACTOR * data_rep, data_rep + REP_COLLAPSE_MARGIN)
    return flags
