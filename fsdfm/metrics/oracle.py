"""Exact metrics of oracle sources: model error (`posterior_kl`) and an n-gram distance that collapse cannot game.

posterior_kl (nats per position): the mean over a fixed grid of t and held-out states x_t ~ p_t(. | x_1) of

    KL(p_exact(. | x_t) || p_theta(. | x_t)) = sum_v p_exact(v) [log p_exact(v) - log p_theta(v)]

at the positions that may still move (the masked ones under the mask source, all under the uniform source), with
p_exact the forward-backward posterior (fsdfm.oracle_posterior). It is the model's own error, apart from the sampler.

ngram_tv / ngram_kl: the samples' empirical n-gram distribution q (every window of n tokens of every sample,
pooled) against the source's exact stationary one p:

    TV = (1/2) sum_g |q(g) - p(g)|,    KL(q || p) = sum_g q(g) log(q(g) / p(g))    (inf if q puts mass where p = 0)

with n = order + 1 for a Markov source (p(c, x) = pi(c) P(x | c)) and n = `HMM_NGRAM` for an HMM (exact observed
n-gram marginals by the forward algorithm). A collapsed sampler can score a low oracle_nll (it repeats the likely
sequences) but not a low n-gram distance. Finite samples leave a floor: the same distance for as many true source
sequences (`ngram_floor`), which shrinks like 1 / sqrt(number of windows).

The oracle corpus metrics (oracle_nll, its floor and the source's entropy rate, the n-gram distances and their
floors) are registered here with needs "oracle": `extra_metrics(config, tokens, corpus)` computes them for a
study whose dataset kind is "oracle" (`corpus_metric_names(config)` names them; their versions enter the evaluate
stages' ids). posterior_kl is recorded by the training stage. This module knows the sources' exact distributions;
it knows nothing about stages or records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from fsdfm.data.oracle import ORACLE_SOURCES, HMMSource, MarkovSource, OracleSource

from fsdfm.metrics.registry import METRICS, register_metric
from fsdfm.metrics.sample import MetricOutcome
from fsdfm.data import DataConfig, oracle_source

__all__ = [
    "HMM_NGRAM",
    "NgramDistance",
    "exact_ngram",
    "ngram_distance",
    "ngram_floor",
    "posterior_kl",
    "POSTERIOR_KL_T_GRID",
    "ExtraMetrics",
    "OracleInputs",
    "corpus_metric_names",
    "extra_metrics",
]

HMM_NGRAM = 2
POSTERIOR_KL_T_GRID = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # t = 0.05, 0.15, ..., 0.95
MAX_NGRAM_BINS = 1 << 22


@dataclass(frozen=True)
class NgramDistance:
    """tv and kl (nats) between the empirical and the exact n-gram distribution; n the n-gram length;
    n_windows the number of n-grams counted."""

    tv: float
    kl: float
    n: int
    n_windows: int


def ngram_order(source: OracleSource) -> int:
    """The n of the n-gram distance: order + 1 (Markov), HMM_NGRAM (HMM)."""
    return source.order + 1 if isinstance(source, MarkovSource) else HMM_NGRAM


def exact_ngram(source: OracleSource, n: int | None = None) -> np.ndarray:
    """The exact stationary distribution of n consecutive tokens, flattened base V (oldest most significant):
    (V^n,) float64. Markov with n = order + 1: pi(c) P(x | c). HMM: the forward algorithm
    p(g) = pi^T diag(B[:, g_0]) A diag(B[:, g_1]) ... A diag(B[:, g_{n-1}]) 1, for all g at once."""
    n = ngram_order(source) if n is None else n
    V = source.vocab_size
    if V**n > MAX_NGRAM_BINS:
        raise ValueError(f"{V}^{n} n-gram bins exceed the limit {MAX_NGRAM_BINS}")
    if isinstance(source, MarkovSource):
        if n != source.order + 1:
            raise ValueError(
                f"a Markov source of order {source.order} has an exact n-gram table for n = order + 1 only"
            )
        T = np.zeros((source.n_contexts, V))
        np.put_along_axis(T, source.next_tokens, (1 - source.epsilon) * source.next_probs, axis=1)
        T += source.epsilon / V
        return (source.stationary[:, None] * T).ravel()
    if isinstance(source, HMMSource):
        # f[g, h] = p(g_0..g_j, h_j = h): start pi * B, then (f A) * B per token
        f = (source.stationary[:, None] * source.emission).T  # (V, S)
        for _ in range(n - 1):
            f = ((f @ source.transition)[:, None, :] * source.emission.T[None, :, :]).reshape(-1, source.n_states)
        return f.sum(1)
    raise TypeError(f"no exact n-gram table for {type(source).__name__}")


def ngram_counts(tokens: np.ndarray, vocab_size: int, n: int) -> np.ndarray:
    """Counts of every window of n tokens of every row of tokens (N, L), flattened base V: (V^n,) float64."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape[1] < n:
        raise ValueError(f"sequences of length {tokens.shape[1]} hold no {n}-gram")
    idx = np.zeros((tokens.shape[0], tokens.shape[1] - n + 1), dtype=np.int64)
    for j in range(n):
        idx = idx * vocab_size + tokens[:, j : tokens.shape[1] - n + 1 + j]
    return np.bincount(idx.ravel(), minlength=vocab_size**n).astype(np.float64)


def ngram_distance(
    tokens, source: OracleSource, n: int | None = None, exact: np.ndarray | None = None
) -> NgramDistance:
    """TV and KL(empirical || exact) of the n-grams of tokens (N, L) (numpy or torch) under `source`."""
    tokens = source.check_tokens(tokens)
    n = ngram_order(source) if n is None else n
    p = exact_ngram(source, n) if exact is None else exact
    counts = ngram_counts(tokens, source.vocab_size, n)
    q = counts / counts.sum()
    tv = 0.5 * float(np.abs(q - p).sum())
    seen = q > 0
    with np.errstate(divide="ignore"):
        kl = float(np.sum(q[seen] * (np.log(q[seen]) - np.log(p[seen]))))
    return NgramDistance(tv=tv, kl=kl, n=n, n_windows=int(counts.sum()))


def ngram_floor(source: OracleSource, n_samples: int, seq_len: int, seed: int) -> NgramDistance:
    """The finite-sample floor: the n-gram distance of n_samples true source sequences (drawn with `seed`)."""
    return ngram_distance(source.sample(n_samples, seq_len, seed=seed), source)


@torch.no_grad()
def posterior_kl(
    model: Callable,
    exact: Callable,
    path,
    x_1: torch.Tensor,
    generator: torch.Generator,
    t_grid: tuple = POSTERIOR_KL_T_GRID,
    h: float | None = None,
    batch_size: int = 256,
) -> float:
    """Mean KL(p_exact || p_theta) in nats per movable position over t in t_grid and states x_t ~ p_t(. | x_1).

    Args:
        model: f(x_t, t[, h]) -> logits (B, L, V) (h passed when not None: the student at its smallest step).
        exact: an ExactPosterior (or any f(x_t, t) -> exact logits).
        path: the MixturePath both are read on.
        x_1: (N, L) held-out clean sequences; each is noised once per t.
        generator: the noise of the path draws (fixed seed: the same states for every model).
    Returns:
        the KL averaged over every movable position of every state (float, nats).
    """
    total, count = 0.0, 0.0
    dev = x_1.device
    for t_value in t_grid:
        for s in range(0, len(x_1), batch_size):
            xb = x_1[s : s + batch_size]
            t = torch.full((len(xb),), float(t_value), device=dev)
            x_t = path.sample(xb, t, generator).x_t
            log_p = torch.log_softmax(exact(x_t, t.double()).double(), -1)
            args = (x_t, t) if h is None else (x_t, t, torch.full_like(t, float(h)))
            log_q = torch.log_softmax(model(*args).double(), -1)
            p = log_p.exp()
            kl = (p * (log_p - log_q)).sum(-1)  # exp(log_p) = 0 at impossible tokens: no contribution
            w = path.source.movable(x_t).double()
            total += float((kl * w).sum())
            count += float(w.sum())
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------- the registered metrics
register_metric(
    "posterior_kl",
    direction="min",
    unit="nats/position",
    family="oracle",
    recorded_by="the training stage (fsdfm.metrics.oracle.posterior_kl on the trained model)",
    sources=(
        "fsdfm.metrics.oracle:posterior_kl",
        "fsdfm.oracle_posterior",
        "fsdfm.methods.common:oracle_model_metrics",
    ),
    description="model error: mean KL(exact posterior || model p_{1|t}) over a fixed t grid and held-out "
    "path states, at movable positions (the FS-DFM student at its smallest step); recorded by "
    "the training stage",
)


@dataclass(frozen=True)
class ExtraMetrics:
    """What a dataset kind adds: `values` {name: float} and `per_sample` {column: (N,) array}."""

    values: dict
    per_sample: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OracleInputs:
    """What an oracle metric sees: the study `config` (its data section names the source) and the samples
    `tokens` (N, L); the source, the n-gram distance and its floor are computed once, when first asked."""

    config: dict
    tokens: np.ndarray

    @cached_property
    def source(self) -> OracleSource:

        return oracle_source(DataConfig(**self.config["data"]))

    @cached_property
    def distance(self) -> NgramDistance:
        return ngram_distance(self.tokens, self.source)

    @cached_property
    def floor(self) -> NgramDistance:
        # the floor: as many true sequences, drawn with a seed that neither split uses
        n, length = self.tokens.shape
        return ngram_floor(self.source, n, length, seed=int(self.config["data"]["oracle"].get("seed", 0)) * 1000 + 3)


def _oracle(name: str, direction: str | None, unit: str, description: str, show: dict | None = None):
    # sources: an oracle_* metric is its function and the source's likelihood code; an n-gram metric shares this
    # module's n-gram machinery, so the whole module is its source
    if name.startswith("oracle_"):
        sources = (*ORACLE_SOURCES, f"fsdfm.metrics.oracle:_{name}", "fsdfm.metrics.oracle:OracleInputs")
    else:
        sources = ("fsdfm.metrics.oracle", *ORACLE_SOURCES)
    return register_metric(
        name,
        direction=direction,
        unit=unit,
        family="oracle",
        needs=("oracle",),
        show=show or {},
        description=description,
        sources=sources,
    )


@_oracle(
    "oracle_nll", "min", "nats/token", "NLL of the samples under the known oracle source", show={"main": 9, "pairs": 5}
)
def _oracle_nll(x: OracleInputs) -> MetricOutcome:
    """oracle_nll of the samples; per sample, oracle_nll_i = -log p(x_i) / L (their mean is oracle_nll)."""
    per_sample = -np.asarray(x.source.log_prob(x.source.check_tokens(x.tokens)), dtype=np.float64) / x.tokens.shape[1]
    return MetricOutcome(float(x.source.nll_per_token(x.tokens)), len(x.tokens), per_sample={"oracle_nll": per_sample})


@_oracle(
    "oracle_expected_nll",
    None,
    "nats/token",
    "the source's own exact expected NLL per token of length-L sequences: the floor oracle_nll is compared with",
    show={"main": 12},
)
def _oracle_expected_nll(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(float(x.source.expected_nll_per_token(x.tokens.shape[1])), len(x.tokens))


@_oracle("oracle_entropy_rate", None, "nats/token", "entropy rate of the oracle source", show={"main": 13})
def _oracle_entropy_rate(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(float(x.source.entropy_rate), len(x.tokens))


@_oracle(
    "ngram_tv",
    "min",
    "TV",
    "total variation between the samples' empirical (order + 1)-gram distribution "
    "(HMM: bigram) and the source's exact stationary one; collapse cannot game it",
    show={"main": 10},
)
def _ngram_tv(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(x.distance.tv, len(x.tokens))


@_oracle("ngram_kl", "min", "nats", "KL(empirical n-grams || exact stationary n-grams) of the samples")
def _ngram_kl(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(x.distance.kl, len(x.tokens))


@_oracle(
    "ngram_tv_floor",
    None,
    "TV",
    "ngram_tv of as many true source sequences: the finite-sample floor of ngram_tv",
    show={"main": 11},
)
def _ngram_tv_floor(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(x.floor.tv, len(x.tokens))


@_oracle("ngram_kl_floor", None, "nats", "ngram_kl of as many true source sequences (its floor)")
def _ngram_kl_floor(x: OracleInputs) -> MetricOutcome:
    return MetricOutcome(x.floor.kl, len(x.tokens))


# the dataset kind that provides each corpus need (only synthetic sources have an exact likelihood)
_KIND_NEEDS = {"oracle": "oracle"}


def corpus_metric_names(config: dict) -> tuple:
    """Names of the metrics `extra_metrics` adds for this config's dataset kind."""
    need = _KIND_NEEDS.get((config.get("data") or {}).get("kind"))
    return tuple(n for n in METRICS.names() if METRICS.get(n).computed and need in METRICS.get(n).needs) if need else ()


def extra_metrics(config: dict, tokens: np.ndarray, corpus) -> ExtraMetrics:
    """Metrics a dataset kind adds (e.g. oracle_nll for synthetic sources): every registered metric whose needs the
    kind provides, computed on the samples `tokens` (N, L). `corpus` is the study's corpus (unused by the oracle
    metrics, which rebuild the source from the config: a pure function of it)."""
    names = corpus_metric_names({"data": {"kind": config["data"]["kind"]}})
    if not names:
        return ExtraMetrics({})
    x = OracleInputs(config, tokens)
    values, per_sample = {}, {}
    for name in names:
        out = METRICS.get(name).compute(x)
        values[name] = float(out.value)
        per_sample.update(out.per_sample)
    return ExtraMetrics(values, per_sample)
