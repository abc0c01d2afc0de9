"""Every metric name the suite reports, with its direction, unit and family.

`METRICS.get(name)` returns a `MetricInfo`; reports use `direction` to rank a column ("min": lower is
better, "max": higher is better, None: no better side, e.g. entropy, which should sit near the data's rather
than be pushed up or down). Metrics whose target is the data (entropy, distinct-n, self-BLEU, rep-n) are
ranked by distance to the data row whatever their direction (`fsdfm.report.significance`). The functions that compute the sample-based metrics
live in `fsdfm.metrics` (`compute_metrics`); the rest are recorded by the stage that owns them
(sampling: nfe/wall_s/tokens_per_s/peak_mem; training: val_nll/elbo_ppl; oracle data: oracle_nll;
`fsdfm.metrics.divergence`: pos_divergence).
"""

from __future__ import annotations

from dataclasses import dataclass

from fsdfm.registry import Registry

DIRECTIONS = ("min", "max", None)


@dataclass(frozen=True)
class MetricInfo:
    """Static description of one metric: `name`, `direction` ("min" | "max" | None), `unit`, `family`.

    `version` is bumped whenever the metric's value can change for the same samples (a fix, a new convention);
    it enters the id of every stage that computes the metric, so only those stages re-run (tests/test_versions.py
    fails when the metric's sources change without a bump; see `fsdfm.versions`)."""

    name: str
    direction: str | None
    unit: str
    family: str
    description: str
    version: str = "1"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction must be one of {DIRECTIONS}, got {self.direction!r}")

    def best(self, values: list[float]) -> float | None:
        """The best of `values` by this metric's direction (None when the metric has no direction)."""
        if self.direction is None or not values:
            return None
        return min(values) if self.direction == "min" else max(values)


METRICS: Registry[MetricInfo] = Registry("metric")


def _add(name: str, direction: str | None, unit: str, family: str, description: str, version: str = "1") -> None:
    METRICS.register(name, MetricInfo(name, direction, unit, family, description, version))


# --- perplexity (fsdfm/metrics/perplexity.py)
_add("gen_ppl", "min", "ppl", "perplexity",
     "token-pooled exp(sum NLL / sum tokens) of the re-tokenized decoded samples under the evaluator LM (fp32; "
     "first token unscored; non-EOS tokens plus the first EOS scored)")
_add("gen_ppl_seq_mean", "min", "ppl", "perplexity",
     "FS-DFM/SEDD convention: mean over samples of exp(mean NLL) on the raw ids (tokenizers must match)")
# --- diversity (fsdfm/metrics/diversity.py)
_add("entropy_nats", None, "nats", "diversity", "per-sample unigram entropy of the token ids, averaged over samples")
_add("entropy_bits", None, "bits", "diversity", "entropy_nats / ln 2")
for _n in range(1, 5):
    _add(f"distinct_{_n}", "max", "fraction", "diversity",
         f"unique {_n}-grams / total {_n}-grams, pooled over all samples")
_add("self_bleu", "min", "BLEU", "diversity",
     "mean sacrebleu sentence BLEU-4 of each (subsampled, seeded) sample against all the other samples")
_add("rep_n", "min", "fraction", "diversity",
     "within-sample fraction of repeated 4-grams (1 - unique/total per sample), averaged over samples")
# --- MAUVE (fsdfm/metrics/mauve.py)
_add("mauve", "max", "score", "mauve",
     "mauve-text on featurizer features between the samples and as many held-out real texts")
# --- cost (fsdfm/metrics/timing.py), recorded by the sampling stage; evaluator time excluded
_add("nfe", "min", "evals", "timing", "counted model forward calls per sampling run")
_add("wall_s", "min", "s", "timing", "sampling wall-clock seconds (warm-up excluded, CUDA synchronised)")
_add("tokens_per_s", "max", "tok/s", "timing", "generated tokens per second of sampling wall-clock")
_add("peak_mem", "min", "bytes", "timing", "peak memory while sampling (CUDA max allocated, or process peak RSS)")
# --- likelihood, recorded by the training/evaluation stage of methods that have a bound
_add("val_nll", "min", "nats/token", "likelihood", "held-out NLL (or its upper bound) per token")
_add("elbo_ppl", "min", "ppl", "likelihood", "exp(val_nll): perplexity bound on held-out data")
# --- per-position divergence (fsdfm/metrics/divergence.py)
_add("pos_divergence", "min", "TV", "divergence",
     "per-position total variation between few-step and many-step teacher marginals from the same start state "
     "(a curve over positions; its mean as a scalar)")
_add("pos_divergence_slope", "min", "TV/sequence", "divergence",
     "least-squares slope of the pos_divergence TV curve against normalised position 0..1 (positive: error grows)")
# --- oracle data (synthetic sources with a known likelihood)
_add("oracle_nll", "min", "nats/token", "oracle", "NLL of the samples under the known oracle source")
_add("oracle_expected_nll", None, "nats/token", "oracle",
     "the source's own exact expected NLL per token of length-L sequences: the floor oracle_nll is compared with")
_add("oracle_entropy_rate", None, "nats/token", "oracle", "entropy rate of the oracle source")
# --- exact oracle metrics (fsdfm/metrics/oracle.py)
_add("posterior_kl", "min", "nats/position", "oracle",
     "model error: mean KL(exact posterior || model p_{1|t}) over a fixed t grid and held-out path states, at "
     "movable positions (the FS-DFM student at its smallest step); recorded by the training stage")
_add("ngram_tv", "min", "TV", "oracle",
     "total variation between the samples' empirical (order + 1)-gram distribution (HMM: bigram) and the source's "
     "exact stationary one; collapse cannot game it")
_add("ngram_kl", "min", "nats", "oracle", "KL(empirical n-grams || exact stationary n-grams) of the samples")
_add("ngram_tv_floor", None, "TV", "oracle",
     "ngram_tv of as many true source sequences: the finite-sample floor of ngram_tv")
_add("ngram_kl_floor", None, "nats", "oracle", "ngram_kl of as many true source sequences (its floor)")
