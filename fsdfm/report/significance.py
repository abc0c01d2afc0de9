"""Which differences in a table mean something: significance-aware "best" marks and paired comparisons.

A cell is marked best only when its difference from the runner-up is significant; a difference inside the
noise is a tie. Every metric is first put on a "lower is better" score z:

    z = x                       direction "min"
    z = -x                      direction "max"
    z = s (x - D),  s = sign(mean - D)     metrics whose target is the data row's value D (entropy, distinct-n,
                                           self-BLEU, rep-n): distance to the data row, sign-aligned so that
                                           the per-value scores keep their spread (|mean - D| = s (mean - D))

and rows are ranked by mean z. The best and the runner-up are compared by Welch's t-test on their z values,

    t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b),   Welch-Satterthwaite degrees of freedom,

taken across seeds where both rows have >= 2 seeds, else across per-sample values where the metric has a
per-sample column (`PER_SAMPLE_VALUES`); with neither, the difference cannot be tested and nothing is
marked. Two rows with zero spread differ significantly iff their means differ. Significance: p < ALPHA.

`compare` gives the difference of two settings with a confidence interval: a paired t interval across
matched seeds where both have >= 2 seeds with the same seed values, else Welch's interval across the
per-sample values (the samples of two models are independent draws, so they are not paired by index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from fsdfm.metrics.registry import METRICS

ALPHA = 0.05
LEVEL = 0.95


def _per_token(num: str, den: str) -> Callable[[pd.DataFrame], pd.Series]:
    def f(df: pd.DataFrame) -> pd.Series:
        tokens = pd.to_numeric(df[den], errors="coerce")
        return (pd.to_numeric(df[num], errors="coerce") / tokens).where(tokens > 0)

    return f


def _column(name: str, scale: float = 1.0) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda df: pd.to_numeric(df[name], errors="coerce") * scale


# metric -> (columns of the per-sample table it needs, per-sample value, what the value is)
PER_SAMPLE_VALUES: dict[str, tuple[tuple, Callable, str]] = {
    "gen_ppl": (("nll", "n_tokens"), _per_token("nll", "n_tokens"), "NLL per scored token (nats)"),
    "gen_ppl_seq_mean": (("seq_nll", "seq_n_tokens"), _per_token("seq_nll", "seq_n_tokens"), "mean NLL (nats)"),
    "entropy_nats": (("entropy_nats",), _column("entropy_nats"), "unigram entropy (nats)"),
    "entropy_bits": (("entropy_nats",), _column("entropy_nats", 1 / math.log(2)), "unigram entropy (bits)"),
    "rep_n": (("rep_n",), _column("rep_n"), "repeated 4-gram fraction"),
    "oracle_nll": (("oracle_nll",), _column("oracle_nll"), "oracle NLL per token (nats)"),
}


def per_sample_values(samples: pd.DataFrame, metric: str) -> np.ndarray | None:
    """The per-sample values of `metric` in a per-sample table (NaN dropped); None when it has none."""
    entry = PER_SAMPLE_VALUES.get(metric)
    if entry is None or samples is None or not set(entry[0]) <= set(samples.columns):
        return None
    values = entry[1](samples).dropna().to_numpy(dtype=float)
    return values if len(values) else None


def is_data_target(metric: str) -> bool:
    """Whether the metric's target is the data's value rather than a direction (its registry entry's
    `target="data"`: more diversity than the data is not better)."""
    return metric in METRICS and METRICS.get(metric).goal == "data"


def score(metric: str, x: np.ndarray, data_mean: float | None) -> np.ndarray | None:
    """Values -> lower-is-better scores z (module docstring); None when the metric cannot be ranked (no
    direction, or a data-target metric without a data row)."""
    x = np.asarray(x, dtype=float)
    if is_data_target(metric):
        if data_mean is None or not math.isfinite(data_mean):
            return None
        s = 1.0 if x.mean() >= data_mean else -1.0
        return s * (x - data_mean)
    direction = METRICS.get(metric).direction if metric in METRICS else None
    if direction == "min":
        return x
    if direction == "max":
        return -x
    return None


@dataclass(frozen=True)
class Welch:
    """Welch's two-sample comparison of a and b: `diff` = mean_a - mean_b, `p` (two-sided), `ci` (LEVEL) of the
    difference, `df`, sample sizes."""

    diff: float
    p: float
    ci: tuple
    df: float
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Welch:
    """Welch's t-test and interval; with zero spread on both sides, p = 0 if the means differ else 1."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch: needs >= 2 values per side, got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    # Welch, not Student: two settings (two models, or one at two step budgets) need not share a variance, and
    # seeds per setting are few and may differ in number. ddof=1: unbiased variances of the means
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values on both sides (e.g. a metric the samples saturate): no t to compute
        return Welch(diff, 0.0 if diff != 0 else 1.0, (diff, diff), math.inf, len(a), len(b))
    # Welch-Satterthwaite: the degrees of freedom of the t distribution that best matches (va + vb)'s spread
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + level / 2, df) * se)
    return Welch(diff, p, (diff - half, diff + half), float(df), len(a), len(b))


@dataclass(frozen=True)
class Candidate:
    """One row competing for best in a column: `key` (row id), `seeds` (per-seed values), `samples`
    (per-sample values or None)."""

    key: object
    seeds: np.ndarray
    samples: np.ndarray | None = None


@dataclass(frozen=True)
class Marks:
    """The outcome for one column: `best` (rows marked best: at most one), `tied` (rows tied for best),
    `test` ("seeds", "samples", or None when untestable / not ranked), `p` of best vs runner-up."""

    best: tuple = ()
    tied: tuple = ()
    test: str | None = None
    p: float | None = None
    untestable: bool = False


def _values(c: Candidate, test: str) -> np.ndarray:
    return c.seeds if test == "seeds" else c.samples


def mark_best(
    metric: str,
    candidates: Sequence[Candidate],
    data_mean: float | None = None,
    alpha: float = ALPHA,
    shown: Callable[[float], str] | None = None,
) -> Marks:
    """Mark the best of `candidates` only when it differs significantly from the runner-up (module docstring).

    shown: the display formatter; rows whose shown means are equal are tied without a test. Rows not
    significantly different from the best are `tied` (nothing is marked when every row ties).
    """
    candidates = [c for c in candidates if len(c.seeds)]
    if len(candidates) < 2:  # a lone row is best of nothing
        return Marks()
    ranked = []
    for c in candidates:
        z_seeds = score(metric, c.seeds, data_mean)
        if z_seeds is None:
            return Marks()
        ranked.append((float(z_seeds.mean()), c))
    ranked.sort(key=lambda r: r[0])
    best = ranked[0][1]

    def z(c: Candidate, test: str) -> np.ndarray:
        # sign-align per-sample / per-seed values by the row's own mean, as `score` does for the ranking
        vals = _values(c, test)
        if is_data_target(metric):
            s = 1.0 if c.seeds.mean() >= data_mean else -1.0
            return s * (vals - data_mean)
        return score(metric, vals, data_mean)

    def compare(other: Candidate) -> tuple[str | None, float | None]:
        if shown is not None and shown(float(best.seeds.mean())) == shown(float(other.seeds.mean())):
            return "shown", 1.0
        if len(best.seeds) >= 2 and len(other.seeds) >= 2:
            test = "seeds"
        elif (
            best.samples is not None
            and other.samples is not None
            and len(best.samples) >= 2
            and len(other.samples) >= 2
        ):
            test = "samples"
        else:
            return None, None
        return test, welch(z(best, test), z(other, test)).p

    # Only best vs runner-up decides the mark: if the best does not beat the second-ranked row it beats no row
    # for sure, so one test (not one per pair) keeps the false-mark rate at alpha per column
    test, p = compare(ranked[1][1])
    if test is None:
        return Marks(untestable=True)
    if test != "shown" and p < alpha:
        return Marks(best=(best.key,), test=test, p=p)
    # not significant: every row the best cannot be told from is tied with it (each its own test vs the best)
    tied = [best.key]
    for _, other in ranked[1:]:
        t, q = compare(other)
        if t is not None and (t == "shown" or q >= alpha):
            tied.append(other.key)
    used = test if test != "shown" else None
    if len(tied) == len(ranked):
        return Marks(test=used, p=p)
    return Marks(tied=tuple(tied), test=used, p=p)


@dataclass(frozen=True)
class Comparison:
    """A - B for one metric: means, `diff`, `ci` (LEVEL), `p`, `test` ("paired t across seeds" or "Welch across
    samples"), `n` (seed pairs, or samples per side as "n_a/n_b"), and what the values are (`of`)."""

    metric: str
    mean_a: float
    mean_b: float
    diff: float
    ci: tuple
    p: float
    test: str
    n: str
    of: str


def paired_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, tuple, float]:
    """(mean difference, LEVEL interval, two-sided p) of the paired differences a_k - b_k."""
    from scipy import stats

    # paired: the two settings at one seed share that seed's data order and initial draws, so the differences
    # remove the seed-to-seed variation both sides share; a t interval on k - 1 degrees of freedom
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, k = float(d.mean()), len(d)
    se = float(d.std(ddof=1) / math.sqrt(k))
    if se == 0.0:
        return mean, (mean, mean), (0.0 if mean != 0 else 1.0)
    half = float(stats.t.ppf(0.5 + level / 2, k - 1) * se)
    return mean, (mean - half, mean + half), float(2 * stats.t.sf(abs(mean / se), k - 1))


def compare(
    metric: str, seeds_a: dict, seeds_b: dict, samples_a: pd.DataFrame | None, samples_b: pd.DataFrame | None
) -> Comparison | None:
    """A - B on `metric`. seeds_a / seeds_b: {seed value: run-level metric value}; samples_*: per-sample tables.
    Paired across seeds where >= 2 seed values are shared, else Welch across per-sample values; None when
    neither is possible."""
    shared = [k for k in seeds_a if k in seeds_b]  # seeds matched by value, never by position
    if len(shared) >= 2:  # a paired t needs >= 2 differences to estimate their spread
        a = [seeds_a[k] for k in shared]
        b = [seeds_b[k] for k in shared]
        diff, ci, p = paired_t(a, b)
        return Comparison(
            metric,
            float(np.mean(a)),
            float(np.mean(b)),
            diff,
            ci,
            p,
            "paired t across seeds",
            str(len(shared)),
            f"run-level {metric}",
        )
    # Welch, unpaired: sample i of model A and sample i of model B are independent draws; pairing them by index
    # would claim a correlation that does not exist. Per-sample values treat one seed's samples as the population
    va = per_sample_values(samples_a, metric) if samples_a is not None else None
    vb = per_sample_values(samples_b, metric) if samples_b is not None else None
    if va is None or vb is None or len(va) < 2 or len(vb) < 2:
        return None
    w = welch(va, vb)
    return Comparison(
        metric,
        float(va.mean()),
        float(vb.mean()),
        w.diff,
        w.ci,
        w.p,
        "Welch across samples",
        f"{w.n_a}/{w.n_b}",
        PER_SAMPLE_VALUES[metric][2],
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family of m tests (controls the family-wise error rate):
    with p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), in the input order.
    NaN p-values are not tests: they stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
