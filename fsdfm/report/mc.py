"""Monte-Carlo standard errors of per-run sample means (oracle_nll, the samples' entropy), from the per-sample
table every evaluate stage writes: a run's mean over n samples has SE = std(values, ddof 1) / sqrt(n); the mean of
a setting's k run means has SE = sqrt(sum_r SE_r^2) / k (sampling noise only, not the spread across training seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fsdfm.report.summary import Study

__all__ = ["mc_standard_errors", "pooled_se"]


def mc_standard_errors(study: Study) -> pd.DataFrame:
    """Per run: the Monte-Carlo standard error of oracle_nll and of the samples' entropy, std(per-sample values,
    ddof 1) / sqrt(n) from the per-sample table; columns run_id, oracle_nll, entropy_nats (NaN where absent)."""
    samples = study.samples
    cols = [c for c in ("oracle_nll", "entropy_nats") if samples is not None and c in samples]
    if samples is None or not len(samples) or "run_id" not in samples or not cols:
        return pd.DataFrame(columns=["run_id", "oracle_nll", "entropy_nats"])
    vals = samples[["run_id", *cols]].copy()
    for c in cols:
        vals[c] = pd.to_numeric(vals[c], errors="coerce")
    g = vals.groupby("run_id")
    out = (g[cols].std(ddof=1) / np.sqrt(g[cols].count())).reset_index()
    for c in ("oracle_nll", "entropy_nats"):
        if c not in out:
            out[c] = math.nan
    return out


def pooled_se(se: pd.DataFrame, run_ids, metric: str) -> float:
    """The standard error of the mean over a setting's runs of their own means: sqrt(sum_r SE_r^2) / n_runs."""
    v = pd.to_numeric(se[se["run_id"].isin(list(run_ids))][metric], errors="coerce").dropna()
    return float(np.sqrt((v**2).sum()) / len(v)) if len(v) else math.nan
