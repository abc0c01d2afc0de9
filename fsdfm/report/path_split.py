"""The trajectory KL and its split at the study's own scale (studies with `metrics.path_split`: the path_split runs of
`fsdfm.methods.path_split`), beside the CE excess the samples of the same setting show.

Per (source, method, rule, steps), over the training seeds (mean ± std; the exact denoiser has one "seed"), per
token: trajectory KL = factorization (the exact step's total correlation, the same for every product sampler on
the grid) + per-position (the rule's discretization and the model's error). Reads the runs, the plan and the
per-sample table; knows nothing about how the split was computed.
"""

from __future__ import annotations

import math

import pandas as pd

from fsdfm.report.exact_law import _law_runs, _sample_runs, _sampled_ce_excess
from fsdfm.report.exact_samplers import _per_sample
from fsdfm.report.oracle import path_source
from fsdfm.report.summary import SPLIT_KIND, Study
from fsdfm.report.table import DASH, Table, fmt_mean_std

__all__ = ["path_split_frame", "path_split_table"]

COLUMNS = ("traj_kl", "traj_factorization", "traj_per_position")


def path_split_frame(study: Study) -> pd.DataFrame:
    """One row per (source, label, rule, steps) of the path_split runs: n models, mean and std of each term, and the
    sampled CE excess of the same models (`ce_sampled`, `ce_sampled_hw`, `n_samples`). Empty without such runs."""
    runs = _law_runs(study, SPLIT_KIND)
    if runs.empty:
        return pd.DataFrame()
    nll, sampled = _per_sample(study, "oracle_nll"), _sample_runs(study)
    rows = []
    for (path, label, method, rule, steps), g in runs.groupby(
        [runs["path"].fillna("?"), "label", "method", "rule", "steps"], sort=False
    ):
        row = {"source": path_source(path), "label": label, "method": method, "rule": rule, "steps": int(steps),
               "n": len(g)}  # fmt: skip
        for c in COLUMNS:
            v = pd.to_numeric(g[c], errors="coerce") if c in g else pd.Series(dtype=float)
            # recorded as None: the model puts no mass where the exact step goes (KL = inf)
            row[c] = math.inf if v.isna().any() and len(v) else float(v.mean()) if len(v) else math.nan
            row[c + "_std"] = float(v.std(ddof=1)) if len(v) > 1 and v.notna().all() else math.nan
        ce, hw, n = _sampled_ce_excess(sampled, set(g["model"]), rule, int(steps), nll)
        rows.append(row | {"ce_sampled": ce, "ce_sampled_hw": hw, "n_samples": n})
    return pd.DataFrame(rows)


def _cells(r: pd.Series) -> tuple:
    def ms(c: str) -> str:
        return "∞" if r[c] == math.inf else fmt_mean_std(r[c], r[c + "_std"], int(r["n"]), "nats/token")

    sampled = DASH if not math.isfinite(r["ce_sampled"]) else f"{r['ce_sampled']:.3f} ± {r['ce_sampled_hw']:.3f}"
    share = r["traj_factorization"] / r["traj_kl"] if 0 < r["traj_kl"] < math.inf else math.nan
    return (r["source"], r["label"], r["rule"], str(r["steps"]), str(r["n"]), ms("traj_kl"), ms("traj_factorization"),
            ms("traj_per_position"), DASH if math.isnan(share) else f"{share:.0%}", sampled)  # fmt: skip


def path_split_table(study: Study) -> Table:
    """The trajectory KL split at the study's sequence length, as a Table."""
    frame = path_split_frame(study)
    columns = ("source", "method", "rule", "steps", "n models", "trajectory KL ↓", "factorization", "per-position ↓",
               "factorization share", "CE excess (samples, 95%)")  # fmt: skip
    cells, sections = [], []
    if not frame.empty:
        frame = frame.sort_values(["source", "steps"], kind="stable").reset_index(drop=True)
        cells = [_cells(r) for _, r in frame.iterrows()]
        sections = [i for i in range(1, len(frame)) if frame["steps"][i] != frame["steps"][i - 1]]
    notes = (
        "Per token (nats / L) at the study's own sequence length, mean ± std over the training seeds (n models). "
        "Trajectory KL: the sum over the grid's steps of E KL(J‖∏Q_i) along the true path (J the exact step, in "
        "closed form under the mask source; Q_i the sampler's per-position kernels; ≥ KL(p‖q) of the outputs) = "
        "factorization (the exact step's total correlation, a Monte-Carlo estimate with exact integrands: no product "
        "sampler removes it on this grid) + per-position (the rule's discretization and the model's error). "
        "Monte-Carlo standard errors over the states are in the records (`traj_*_se`).",
        "CE excess (samples): mean oracle_nll − H_L of the study's samples of the same models, rule and steps, ± the "
        "95% half-width of the pooled per-sample values: a cross-entropy, KL(q‖p)/L + (H(q) − H(p))/L, so a more "
        "diffuse sampler scores worse at equal divergence; the trajectory KL bounds the true KL(p‖q) from above.",
    )
    return Table(
        name="table_path_split",
        title=f"{study.name}: the trajectory KL of each sampler along the true path, factorization vs per-position",
        columns=columns,
        cells=tuple(cells),
        bold=tuple(tuple(False for _ in columns) for _ in cells),
        sections=tuple(sections),
        notes=notes if cells else (),
        numbers=frame,
        n_label_columns=4,
    )
