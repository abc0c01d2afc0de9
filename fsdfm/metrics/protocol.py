"""Generative-perplexity conventions of the evaluation-protocol audit: each differs from a registered convention in
exactly one switch, so one checkpoint shows the spread that different papers' code paths produce.

    gen_ppl               re-tokenized text, token-pooled, first token unscored, full context     (the headline)
    gen_ppl_raw           raw sample ids            (vs gen_ppl: re-tokenization; vs gen_ppl_seq_mean: pooling)
    gen_ppl_seq_mean      raw ids, mean over samples of exp(mean NLL)
    gen_ppl_first_scored  the evaluator's BOS (its EOS id, as GPT-2) prepended: the first token is scored too (an
                          evaluator whose context is the sample length then loses the sample's last token)
    gen_ppl_short_ctx     each sample scored in 4 independent chunks (MDLM's chunking when a sample is longer than
                          the evaluator's context): context restarts, each chunk's first token unscored

All token-pooled ones are exp(sum_i sum_{j in S_i} NLL_ij / sum_i |S_i|) over their scored sets S_i; the scored set
follows gen_ppl's EOS rule (non-EOS tokens plus the first EOS) on the re-tokenized text.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fsdfm.metrics.perplexity import PerplexityResult, _token_nll, gen_ppl_seq_mean
from fsdfm.metrics.registry import register_metric
from fsdfm.metrics.inputs import MetricInputs, MetricOutcome

SHORT_CTX_CHUNKS = 4


def _eos_rule(ids: list[int], eos_id: int | None) -> list[bool]:
    """gen_ppl's rule on one token list: every non-EOS token and the first EOS are scored."""
    out, seen = [], False
    for t in ids:
        first = t == eos_id and not seen
        seen = seen or t == eos_id
        out.append(t != eos_id or first)
    return out


@torch.no_grad()
def pooled_ppl(evaluator, rows: list[list[int]], scored: list[list[bool]], batch_size: int = 8) -> PerplexityResult:
    """Token-pooled perplexity of token rows where scored[i][j] says whether target j >= 1 of row i counts
    (scored[i][0] is ignored: position 0 has no context)."""
    n = len(rows)
    sample_nll, sample_tokens = np.zeros(n), np.zeros(n, dtype=np.int64)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        ids, valid = evaluator.pad([rows[i] for i in idx], min_width=2)
        mask = torch.zeros_like(valid, dtype=torch.bool)
        for k, i in enumerate(idx):
            mask[k, : len(scored[i])] = torch.tensor(scored[i], dtype=torch.bool)
        mask = (mask & valid.bool())[:, 1:]
        nll = torch.where(mask, _token_nll(evaluator, ids, valid).double(), 0.0)
        sample_nll[idx] = nll.sum(1).cpu().numpy()
        sample_tokens[idx] = mask.sum(1).cpu().numpy()
    total, count = math.fsum(sample_nll.tolist()), int(sample_tokens.sum())
    if count == 0:
        raise ValueError("no scorable token in any sample")
    return PerplexityResult(math.exp(total / count), total, count, n, 0, sample_nll=sample_nll,
                            sample_tokens=sample_tokens, sample_truncated=np.zeros(n, dtype=bool))  # fmt: skip


def _encode(x: MetricInputs, name: str) -> tuple[list[list[int]], object]:
    ev = x.need_evaluator(name)
    return ev.tokenizer(x.need_texts(name), add_special_tokens=False)["input_ids"], ev


def _outcome(r: PerplexityResult) -> MetricOutcome:
    return MetricOutcome(r.value, r.n_samples, details={"n_tokens": r.n_tokens, "nll_sum": r.nll_sum})


@register_metric(
    "gen_ppl_raw",
    sources=("fsdfm.metrics.protocol", "fsdfm.metrics.perplexity", "fsdfm.metrics.evaluator"),
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("evaluator",),
    label="perplexity, raw ids, token-pooled",
    description="protocol audit: token-pooled perplexity on the raw sample ids (no re-tokenization), positions >= 1",
)
def _gen_ppl_raw(x: MetricInputs) -> MetricOutcome:
    r = gen_ppl_seq_mean(x.token_ids, x.need_evaluator("gen_ppl_raw"), batch_size=x.batch_size)
    return MetricOutcome(math.exp(r.nll_sum / r.n_tokens), r.n_samples, details={"n_tokens": r.n_tokens})


@register_metric(
    "gen_ppl_first_scored",
    sources=("fsdfm.metrics.protocol", "fsdfm.metrics.perplexity", "fsdfm.metrics.evaluator"),
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("texts", "evaluator"),
    label="perplexity, first token scored",
    description="protocol audit: gen_ppl with the evaluator's BOS (its EOS id) prepended, so the first token is scored",
)
def _gen_ppl_first(x: MetricInputs) -> MetricOutcome:
    enc, ev = _encode(x, "gen_ppl_first_scored")
    bos = ev.eos_token_id if ev.eos_token_id is not None else 0
    cap = ev.max_length or 1 << 30  # an evaluator with a context of L positions cannot take BOS + L tokens:
    rows = [([bos] + e)[:cap] for e in enc]  # the last token then falls out (recorded as n_truncated)
    scored = [([False] + _eos_rule(e, ev.eos_token_id))[:cap] for e in enc]
    r = pooled_ppl(ev, rows, scored, x.batch_size)
    n_cut = sum(len(e) + 1 > cap for e in enc)
    return MetricOutcome(
        r.value, r.n_samples, details={"n_tokens": r.n_tokens, "nll_sum": r.nll_sum, "n_truncated": n_cut}
    )


@register_metric(
    "gen_ppl_short_ctx",
    sources=("fsdfm.metrics.protocol", "fsdfm.metrics.perplexity", "fsdfm.metrics.evaluator"),
    direction="min",
    unit="ppl",
    family="perplexity",
    needs=("texts", "evaluator"),
    label="perplexity, context a quarter of the sample",
    description="protocol audit: gen_ppl with each sample scored in 4 independent chunks (a context shorter than "
    "the sample, as chunked evaluation does)",
)
def _gen_ppl_short(x: MetricInputs) -> MetricOutcome:
    enc, ev = _encode(x, "gen_ppl_short_ctx")
    rows, scored = [], []
    for e in enc:
        rule = _eos_rule(e, ev.eos_token_id)
        size = max(2, -(-len(e) // SHORT_CTX_CHUNKS))
        for a in range(0, max(1, len(e)), size):
            rows.append(e[a : a + size] or [0])
            scored.append(rule[a : a + size] if e[a : a + size] else [False])
    r = pooled_ppl(ev, rows, scored, x.batch_size)
    return MetricOutcome(r.value, len(enc), details={"n_tokens": r.n_tokens, "chunks": SHORT_CTX_CHUNKS})
