"""The built-in sample metrics, each one registered function of `MetricInputs` returning a `MetricOutcome`:
generative perplexity (token-pooled and the per-sample mean), unigram entropy, distinct-n, rep_n, self-BLEU, MAUVE.

Text metrics (MAUVE, self-BLEU) see the texts with end-of-text markers removed (`fsdfm.metrics.texts`). The
computation of each lives in its family's module (`perplexity`, `diversity`, `mauve`); this module states what
each metric is (its `@register_metric` entry) and adapts the inputs. `compute_metrics` (`fsdfm.metrics.compute`)
dispatches to them; it and the input types are re-exported here, their import path before the split.
"""

from __future__ import annotations

import numpy as np

from fsdfm.metrics.compute import (
    SAMPLE_METRICS,
    MetricSet,
    compute_metric_set,
    compute_metrics,
    data_reference,
    data_reference_set,
)
from fsdfm.metrics.diversity import distinct_n, rep_n_mean, rep_n_per_sample, self_bleu
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome
from fsdfm.metrics.mauve import mauve_score
from fsdfm.metrics.perplexity import PerplexityResult, gen_ppl, gen_ppl_seq_mean
from fsdfm.metrics.registry import register_metric
from fsdfm.metrics.texts import convention

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


_PPL = ("fsdfm.metrics.perplexity", "fsdfm.metrics.evaluator")  # shared parts of the declared `sources`
_NGRAMS = ("fsdfm.metrics.diversity:_ngrams", "fsdfm.metrics.diversity:as_token_matrix")
# per-sample lengths (external texts scored at their own length), a no-op on model samples
_LENGTHS = (
    "fsdfm.metrics.diversity:as_lengths",
    "fsdfm.metrics.diversity:valid_mask",
    "fsdfm.metrics.diversity:_gram_mask",
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
    sources=(*_PPL, "fsdfm.metrics.sample:_gen_ppl"),
)
def _gen_ppl(x: MetricInputs) -> MetricOutcome:
    texts, evaluator = x.need_texts("gen_ppl"), x.need_evaluator("gen_ppl")
    result = gen_ppl(texts, evaluator, batch_size=x.batch_size, max_length=x.max_length)
    return _ppl_outcome(result, "")


register_metric(
    "gen_ppl_second",
    direction="min",
    unit="ppl",
    family="perplexity",
    label="generative perplexity under the second evaluator",
    show={"main": 1.5, "pairs": 1.5},
    description="gen_ppl (the same protocol) under the study's second reference evaluator (`evaluator.second`, "
    "e.g. a larger model trained longer): a second opinion on the ranking (table_evaluator_agreement)",
    recorded_by="the evaluate stage, where the spec sets evaluator.second",
    sources=(*_PPL, "fsdfm.methods.evaluate:score_samples"),
)


@register_metric(
    "gen_ppl_seq_mean",
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("evaluator",),
    label="perplexity, mean over samples",
    show={"main": 2, "pairs": 2},
    description="FS-DFM/SEDD convention: mean over samples of exp(mean NLL) on the raw ids (tokenizers must match)",
    sources=(*_LENGTHS, *_PPL, "fsdfm.metrics.sample:_gen_ppl_seq_mean"),
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
    sources=("fsdfm.metrics.diversity:entropy", "fsdfm.metrics.diversity:as_token_matrix", *_LENGTHS),
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
    sources=("fsdfm.metrics.diversity:entropy", "fsdfm.metrics.diversity:as_token_matrix", *_LENGTHS),
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
        sources=("fsdfm.metrics.diversity:distinct_n", *_NGRAMS, *_LENGTHS),
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
    sources=(
        "fsdfm.metrics.diversity:rep_n",
        "fsdfm.metrics.diversity:rep_n_per_sample",
        "fsdfm.metrics.diversity:rep_n_mean",
        *_NGRAMS,
        "fsdfm.metrics.sample:_rep_n",
        *_LENGTHS,
    ),
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
    sources=("fsdfm.metrics.diversity:self_bleu", "fsdfm.metrics.sample:_self_bleu"),
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
    sources=("fsdfm.metrics.mauve", "fsdfm.metrics.sample:_mauve"),
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
