"""Generative perplexity of samples under an evaluator LM.

Two conventions, both reported because the literature mixes them:

* `gen_ppl` (the suite's headline): decode -> re-tokenize with the evaluator's tokenizer (nothing
  prepended) -> score in fp32. Position 0 has no context and is unscored. Of the remaining positions,
  every non-EOS token is scored plus the first EOS of the sequence (as MDLM does: a sample that ends a
  document is charged for the EOS once, not for the run of EOS padding after it). Token-pooled:

      gen_ppl = exp( sum_i sum_{j in S_i} -log p(y_ij | y_i<j)  /  sum_i |S_i| ).

* `gen_ppl_seq_mean` (FS-DFM / SEDD): on the raw sample ids, every position j >= 1 scored,

      gen_ppl_seq_mean = mean_i exp( mean_{j>=1} -log p(x_ij | x_i<j) ),

  only meaningful when the sample tokenizer is the evaluator's; it weights short/easy samples more and is
  always >= the pooled value of the same NLLs (Jensen).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

import torch
import torch.nn.functional as F

from fsdfm.metrics.evaluator import Evaluator
from fsdfm.metrics.diversity import as_lengths, valid_mask


@dataclass(frozen=True)
class PerplexityResult:
    """`value` (perplexity), `nll_sum` (nats), `n_tokens` scored, `n_samples` scored, `n_truncated` texts.

    Per sample, in the input order (None where the convention does not define them):
    `sample_nll` (N,) float64 summed NLL of the scored tokens in nats,
    `sample_tokens` (N,) int64 scored tokens, `sample_truncated` (N,) bool.
    """

    value: float
    nll_sum: float
    n_tokens: int
    n_samples: int
    n_truncated: int = 0
    sample_nll: np.ndarray | None = field(default=None, repr=False, compare=False)
    sample_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)
    sample_truncated: np.ndarray | None = field(default=None, repr=False, compare=False)


def scored_mask(ids: torch.Tensor, valid: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Which targets ids[:, 1:] are scored: (B, L-1) bool.

    ids, valid: (B, L) (valid = attention mask, False on padding). A target is scored when it is valid
    and either not EOS or the first EOS of its row (an EOS at position 0 counts as that first EOS, so
    later EOS are then all unscored).
    """
    valid = valid.bool()
    if eos_id is None:
        keep = valid
    else:
        is_eos = ids == eos_id
        first_eos = is_eos & (is_eos.long().cumsum(dim=1) == 1)
        keep = valid & (~is_eos | first_eos)
    return keep[:, 1:]


def _forward_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L) ids -> (B, L, V) fp32 logits from an Evaluator, an HF causal LM or a plain module."""
    if isinstance(model, Evaluator):
        model = model.model
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):  # an HF model
        out = model(input_ids=ids, attention_mask=attention_mask)
    else:
        out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def _vocab_limit(model) -> int | None:
    """Number of ids the model can embed/score, when it says (Evaluator / HF model); None otherwise."""
    if isinstance(model, Evaluator):
        return model.vocab_size
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return int(model.get_output_embeddings().weight.shape[0])
    return None


def _token_nll(model, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """-log p(ids[:, j] | ids[:, <j]) for j >= 1: (B, L-1) float32."""
    limit = _vocab_limit(model)
    if limit is not None and int(ids.max()) >= limit:
        raise ValueError(
            f"token id {int(ids.max())} is outside the evaluator vocabulary of {limit} "
            "(do the sample and evaluator tokenizers differ?)"
        )
    logits = _forward_logits(model, ids, attention_mask)[:, :-1]
    targets = ids[:, 1:]
    if logits.shape[-1] <= int(targets.max()):
        raise ValueError(
            f"token id {int(targets.max())} is outside the model's {logits.shape[-1]} output logits "
            "(do the sample and evaluator tokenizers differ?)"
        )
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


@torch.no_grad()
def gen_ppl(
    texts: Sequence[str],
    evaluator: Evaluator,
    batch_size: int = 8,
    max_length: int | None = None,
) -> PerplexityResult:
    """Token-pooled generative perplexity of decoded `texts` under `evaluator` (see the module docstring).

    Texts longer than `max_length` evaluator tokens (default: the evaluator's context length) are
    truncated, counted in `n_truncated` and warned about. Batches are right-padded with an attention mask;
    the last, smaller batch is scored too. `nll_sum` is the exactly rounded sum (math.fsum) of the per-sample
    `sample_nll`, so exp(fsum(sample_nll) / sum(sample_tokens)) reproduces `value` bit for bit.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("gen_ppl: no texts to score")
    if batch_size < 1:
        raise ValueError(f"gen_ppl: batch_size must be >= 1, got {batch_size}")
    max_length = max_length or evaluator.max_length
    encoded = evaluator.tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_truncated = 0
    truncated = np.zeros(len(texts), dtype=bool)
    if max_length is not None:
        truncated = np.array([len(e) > max_length for e in encoded], dtype=bool)
        n_truncated = int(truncated.sum())
        encoded = [e[:max_length] for e in encoded]
        if n_truncated:
            warnings.warn(
                f"gen_ppl: {n_truncated} of {len(texts)} texts exceed {max_length} evaluator tokens and were truncated",
                stacklevel=2,
            )
    eos_id = evaluator.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths -> less padding
    sample_nll = np.zeros(len(texts), dtype=np.float64)
    sample_tokens = np.zeros(len(texts), dtype=np.int64)
    n_samples = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [encoded[i] for i in idx]
        ids, valid = evaluator.pad(rows, min_width=2)
        mask = scored_mask(ids, valid, eos_id)
        nll = torch.where(mask, _token_nll(evaluator, ids, valid).double(), 0.0)
        sample_nll[idx] = nll.sum(dim=1).cpu().numpy()
        sample_tokens[idx] = mask.sum(dim=1).cpu().numpy()
        n_samples += len(rows)
    assert n_samples == len(texts), f"gen_ppl scored {n_samples} samples, expected {len(texts)}"
    n_tokens = int(sample_tokens.sum())
    if n_tokens == 0:
        raise ValueError(f"gen_ppl: none of the {len(texts)} texts has a scorable token (all shorter than 2 tokens)")
    nll_sum = math.fsum(sample_nll.tolist())  # exactly rounded: the same total in any order
    return PerplexityResult(
        math.exp(nll_sum / n_tokens),
        nll_sum,
        n_tokens,
        n_samples,
        n_truncated,
        sample_nll=sample_nll,
        sample_tokens=sample_tokens,
        sample_truncated=truncated,
    )


@torch.no_grad()
def gen_ppl_seq_mean(token_ids: torch.Tensor, model, batch_size: int = 8, lengths=None) -> PerplexityResult:
    """Mean over samples of per-sample exp(mean NLL) on raw `token_ids` (N, L), positions 1..L_i-1 scored.

    `model` is an `Evaluator`, an HF causal LM or a module mapping (B, L) ids to (B, L, V) logits. Only
    valid when the samples were tokenized with the evaluator's tokenizer (ids outside its vocabulary raise).
    `lengths` (N,): sample i is its first L_i ids (default: all L); the rest of the row is padding, masked out
    of attention and never scored, and a sample of one id has no scored position (NaN per sample, left out of
    the mean and of `n_samples`). `nll_sum` / `n_tokens` are the pooled totals of the same NLLs.
    """

    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    if token_ids.dim() != 2 or token_ids.shape[0] == 0 or token_ids.shape[1] < 2:
        raise ValueError(f"gen_ppl_seq_mean: token_ids must be (N >= 1, L >= 2), got shape {tuple(token_ids.shape)}")
    lens = as_lengths(lengths, token_ids, "gen_ppl_seq_mean: lengths")
    if lens is None:
        return _seq_mean_full(token_ids, model, batch_size)
    device = model.device if isinstance(model, Evaluator) else next(model.parameters()).device
    valid = valid_mask(lens, token_ids.shape[1])
    sums, counts = [], []
    for start in range(0, token_ids.shape[0], batch_size):
        ids, ok = token_ids[start : start + batch_size].to(device), valid[start : start + batch_size].to(device)
        nll = torch.where(ok[:, 1:], _token_nll(model, ids, ok.long()).double(), 0.0)
        sums.append(nll.sum(dim=1).cpu())
        counts.append(ok[:, 1:].sum(dim=1).cpu())
    sample_nll, sample_tokens = torch.cat(sums).numpy(), torch.cat(counts).numpy().astype(np.int64)
    scored = sample_tokens > 0
    if not scored.any():
        raise ValueError("gen_ppl_seq_mean: every sample has fewer than 2 ids; nothing to score")
    mean_nll = np.where(scored, sample_nll / np.maximum(sample_tokens, 1), np.nan)
    return PerplexityResult(
        value=float(np.exp(mean_nll[scored]).mean()),
        nll_sum=math.fsum(sample_nll.tolist()),
        n_tokens=int(sample_tokens.sum()),
        n_samples=int(scored.sum()),
        sample_nll=np.where(scored, sample_nll, np.nan),
        sample_tokens=sample_tokens,
        sample_truncated=np.zeros(token_ids.shape[0], dtype=bool),
    )


def _seq_mean_full(token_ids: torch.Tensor, model, batch_size: int) -> PerplexityResult:
    """gen_ppl_seq_mean of samples that fill their rows (a model's samples): every position j >= 1 scored."""
    device = model.device if isinstance(model, Evaluator) else next(model.parameters()).device
    per_sample = []
    for start in range(0, token_ids.shape[0], batch_size):
        ids = token_ids[start : start + batch_size].to(device)
        nll = _token_nll(model, ids, torch.ones_like(ids)).double()
        per_sample.append(nll.mean(dim=1).cpu())
    mean_nll = torch.cat(per_sample)
    assert mean_nll.shape[0] == token_ids.shape[0], "gen_ppl_seq_mean: sample count mismatch"
    n_tokens = token_ids.shape[0] * (token_ids.shape[1] - 1)
    return PerplexityResult(
        value=float(mean_nll.exp().mean()),
        nll_sum=float(mean_nll.sum() * (token_ids.shape[1] - 1)),
        n_tokens=n_tokens,
        n_samples=token_ids.shape[0],
        sample_nll=mean_nll.numpy() * (token_ids.shape[1] - 1),
        sample_tokens=np.full(token_ids.shape[0], token_ids.shape[1] - 1, dtype=np.int64),
        sample_truncated=np.zeros(token_ids.shape[0], dtype=bool),
    )
