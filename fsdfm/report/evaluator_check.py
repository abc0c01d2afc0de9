"""The evaluator check: does gen-PPL under the study's trained evaluator rank runs as the exact oracle NLL does?

On an oracle source every run has two scores of the same samples: `gen_ppl`, the perplexity under the study's
trained reference LM (an estimate, what a text study can only report), and `oracle_nll`, the exact cross-entropy of
the samples under the source (nats/token). Both are lower-is-better and log gen_ppl is an NLL per token, so a sound
evaluator ranks runs as the source does. The agreement is Spearman's rank correlation across runs,

    rho = Pearson(rank(log gen_ppl), rank(oracle_nll)),     ranks averaged over ties,

with a 95% percentile bootstrap interval over runs (B = 2000, resampled with replacement; a resample whose ranks are
constant is dropped). Three populations: every model run; trained models only (no exact-denoiser or joint-sampler
row, no sanity row: the naive rows are built to fool perplexity, so they are the check's adversarial cases); and
setting means (method x rule x steps x knobs x ablated keys, each metric averaged over seeds: seed noise removed from
both sides).

Knows nothing about how either metric is computed; reads the study's runs and, on an oracle source, for which runs
are exact, the plan (`fsdfm.report.oracle.annotated_runs`). The same check with `gen_ppl_second` (the second
evaluator, `evaluator.second`) as the reference runs on text studies too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fsdfm.report.oracle import EXACT_KIND, JOINT_KIND, annotated_runs
from fsdfm.report.summary import DEFAULT_BY, Study
from fsdfm.report.table import DASH, Table

__all__ = [
    "RankAgreement",
    "rank_agreement",
    "spearman",
    "evaluator_check_frame",
    "evaluator_check_table",
    "evaluator_agreement_table",
]

N_BOOT = 2000
LEVEL = 0.95
MIN_N = 5  # below this many points a rank correlation (and its bootstrap) says nothing; the row says so
ESTIMATE, TRUTH = "gen_ppl", "oracle_nll"
SECOND = "gen_ppl_second"  # gen_ppl under the second evaluator (evaluator.second): the text study's check


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks of x and y (both (n,)); NaN when either is
    constant or n < 2."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return math.nan
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


@dataclass(frozen=True)
class RankAgreement:
    """Spearman's rho of n paired points with its percentile-bootstrap interval [lo, hi] (NaN below MIN_N)."""

    n: int
    rho: float
    lo: float
    hi: float


def rank_agreement(x: np.ndarray, y: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> RankAgreement:
    """rho(x, y) and its (1 - LEVEL) percentile bootstrap interval over the n points (pairs resampled together).

    Args:
        x, y: (n,) paired scores; pairs with a non-finite value are dropped first.
        n_boot: bootstrap resamples.  seed: the resampling generator's seed (the interval is reproducible).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    rho = spearman(x, y)
    if n < MIN_N or not math.isfinite(rho):
        return RankAgreement(n, rho, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = np.array([spearman(x[i], y[i]) for i in rng.integers(0, n, size=(n_boot, n))])
    draws = draws[np.isfinite(draws)]
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(draws, [a, 1 - a]) if len(draws) else (math.nan, math.nan)
    return RankAgreement(n, rho, float(lo), float(hi))


def evaluator_check_frame(study: Study, truth: str = TRUTH) -> pd.DataFrame:
    """One row per population (all model runs, trained models, setting means): n, rho, lo, hi; empty when the
    study's runs lack gen_ppl or `truth` (oracle_nll; or gen_ppl_second, the second evaluator's gen_ppl, compared
    on its log: a rank correlation is unchanged by it, the setting means are means of NLLs)."""
    # on an oracle source annotated_runs marks which runs sample the exact posterior; it is empty without
    # oracle_nll, so a text study (the second evaluator's home) takes its model runs as they are
    runs = annotated_runs(study) if "oracle_nll" in study.runs else study.models
    if runs.empty or ESTIMATE not in runs or truth not in runs:
        return pd.DataFrame()
    true = pd.to_numeric(runs[truth], errors="coerce")
    runs = runs.assign(
        _est=np.log(pd.to_numeric(runs[ESTIMATE], errors="coerce")),
        _true=np.log(true) if truth.startswith("gen_ppl") else true,
    )
    sanity = runs["sanity"].fillna(False).astype(bool) if "sanity" in runs else pd.Series(False, index=runs.index)
    trained = runs[~runs["kind"].isin([EXACT_KIND, JOINT_KIND]) & ~sanity]
    # a setting is every key that varies but the seed: label, rule, steps, the sampler's knobs, ablated grid keys
    by = [c for c in (*DEFAULT_BY, "knobs", *study.ablation_keys) if c in runs]
    means = runs.groupby(by, dropna=False)[["_est", "_true"]].mean() if by else runs[["_est", "_true"]]
    rows = []
    for population, df in (
        ("every model run", runs),
        ("trained models (no exact, no sanity rows)", trained),
        ("setting means (over seeds)", means),
    ):
        r = rank_agreement(df["_est"].to_numpy(), df["_true"].to_numpy())
        rows.append({"population": population, "n": r.n, "spearman_rho": r.rho, "ci95_lo": r.lo, "ci95_hi": r.hi})
    return pd.DataFrame(rows)


def evaluator_check_table(study: Study, truth: str = TRUTH) -> Table:
    """The evaluator check as a Table: population, n, Spearman rho [95% CI]; truth=SECOND: the agreement of the
    two evaluators (`table_evaluator_agreement`)."""
    frame = evaluator_check_frame(study, truth)
    columns = ("population", "n", f"Spearman rho (gen_ppl vs {truth}) [95% CI]")
    cells = []
    for _, r in frame.iterrows():
        if not math.isfinite(r["spearman_rho"]):
            shown = DASH
        elif r["n"] < MIN_N:
            shown = f"{r['spearman_rho']:.3f} (n < {MIN_N}: no interval)"
        else:
            shown = f"{r['spearman_rho']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"
        cells.append((r["population"], str(int(r["n"])), shown))
    against = (
        "the exact oracle_nll of the same samples; 1 = the evaluator ranks runs exactly as the source does"
        if truth == TRUTH
        else "gen_ppl of the same samples under the second evaluator (evaluator.second); 1 = the two rank runs "
        "alike, which says the ranking does not hang on one small evaluator (not that either is right)"
    )
    notes = (
        f"Spearman's rank correlation between gen_ppl under the study's trained evaluator and {against}. 95% CI: "
        f"percentile bootstrap over the points (B = {N_BOOT}).",
        "The sanity rows are built to fool perplexity (repeat_top): the gap between the first two rows is what they "
        "do to the ranking.",
    )
    return Table(
        name="table_evaluator_check" if truth == TRUTH else "table_evaluator_agreement",
        title=f"{study.name}: does the evaluator rank runs as the exact source does?"
        if truth == TRUTH
        else f"{study.name}: do the two evaluators rank runs alike?",
        columns=columns,
        cells=tuple(cells),
        bold=tuple((False,) * len(columns) for _ in cells),
        sections=(),
        notes=notes if cells else (),
        numbers=frame,
        n_label_columns=1,
    )


def evaluator_agreement_table(study: Study) -> Table:
    """The two evaluators' agreement (`evaluator.second`): Spearman rho of gen_ppl vs gen_ppl_second over runs."""
    return evaluator_check_table(study, SECOND)
