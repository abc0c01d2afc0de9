"""True divergences beside the CE excess (studies with `metrics.exact_law`: the exact_law runs of
`fsdfm.methods.exact_law`).

Per (source, method, rule, steps), over the training seeds (mean ± std; the exact denoiser has one "seed"):

    KL(q || p) / L,  KL(p || q) / L,  (H(q) - H(p)) / L,  CE excess = KL(q || p) / L + (H(q) - H(p)) / L

of the sampler's exact output law q against the source p, and beside them the CE excess the study's samples
estimate (mean oracle_nll - H_L of the matching sample runs, pooled per-sample 95% CI): where the law is exact the
two must agree up to the samples' error, a check of both. Where the split was computed (budgets up to
split_max_steps), the trajectory KL and its two parts: factorization (the exact step's total correlation, what no
product sampler removes on this grid) and per-position (the update rule's discretization and the model's error).

Reads the runs, the plan and the per-sample table; knows nothing about how the laws were computed.
"""

from __future__ import annotations

import math

import pandas as pd

from fsdfm.report.exact_samplers import Z95, _per_sample, _pooled
from fsdfm.report.oracle import model_stage, path_key, path_source
from fsdfm.report.summary import LAW_KIND, Study
from fsdfm.report.table import DASH, Table, fmt_mean_std

__all__ = ["exact_law_frame", "exact_law_table"]

LAW_COLUMNS = ("law_kl_qp", "law_kl_pq", "law_entropy_gap", "law_ce_excess")
SPLIT_COLUMNS = ("split_path_kl", "split_factorization", "split_per_position")


def _law_runs(study: Study, kind: str = LAW_KIND) -> pd.DataFrame:
    """The runs of a diagnostic `kind` (exact_law; path_split) with `model` (the model stage each was computed
    for) and `path` (its key)."""
    runs = study.runs
    if "kind" not in runs or not (runs["kind"] == kind).any():
        return runs.iloc[:0]
    runs = runs[runs["kind"] == kind].copy()
    plan = study.plan["stages"]
    runs["model"] = [(plan.get(s, {}).get("inputs") or {}).get("model") for s in runs["stage_id"]]
    runs["path"] = [path_key(study.plan, m) for m in runs["model"]]
    return runs


def _sample_runs(study: Study) -> pd.DataFrame:
    """The study's sample runs without knobs, each with `model` (its model stage), found once for the whole table."""
    runs = study.models
    if not len(runs) or "oracle_expected_nll" not in runs:
        return runs.iloc[:0]
    if "knobs" in runs:
        runs = runs[runs["knobs"].isna() | (runs["knobs"].astype(str) == "")]
    return runs.assign(model=[model_stage(study.plan, s) for s in runs["stage_id"]])


def _sampled_ce_excess(sampled: pd.DataFrame, models: set, rule: str, steps: int, nll: dict) -> tuple:
    """(CE excess, its 95% half-width, n samples) of the sample runs of the same models (the law rows' model stages:
    no other variant of the method is pooled in), rule and steps. None yet (a study still running): no estimate."""
    if sampled.empty:  # `_sample_runs` found no evaluated sample run: it has no `model` column to filter on
        return math.nan, math.nan, 0
    g = sampled[(sampled["rule"] == rule) & (sampled["steps"] == steps) & sampled["model"].isin(models)]
    v = _pooled(nll, g["run_id"])
    if len(v) < 2:
        return math.nan, math.nan, len(v)
    h_l = float(pd.to_numeric(g["oracle_expected_nll"], errors="coerce").mean())
    return float(v.mean()) - h_l, Z95 * float(v.std(ddof=1)) / math.sqrt(len(v)), len(v)


def exact_law_frame(study: Study) -> pd.DataFrame:
    """One row per (source, label, rule, steps) of the exact_law runs: n models, mean and std of every law and
    split metric, and the sampled CE excess (`ce_sampled`, `ce_sampled_hw`, `n_samples`). Empty without them."""
    runs = _law_runs(study)
    if runs.empty:
        return pd.DataFrame()
    nll, sampled = _per_sample(study, "oracle_nll"), _sample_runs(study)
    rows = []
    for (path, label, method, rule, steps), g in runs.groupby(
        [runs["path"].fillna("?"), "label", "method", "rule", "steps"], sort=False
    ):
        row = {"source": path_source(path), "label": label, "method": method, "rule": rule, "steps": int(steps),
               "n": len(g)}  # fmt: skip
        for c in LAW_COLUMNS + SPLIT_COLUMNS:
            v = pd.to_numeric(g[c], errors="coerce").dropna() if c in g else pd.Series(dtype=float)
            row[c] = float(v.mean()) if len(v) else math.nan
            row[c + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        if "law_kl_pq" in g and g["law_kl_pq"].isna().any():  # recorded as None: q misses mass of p, KL(p‖q) = inf
            row["law_kl_pq"], row["law_kl_pq_std"] = math.inf, math.nan
        ce, hw, n = _sampled_ce_excess(sampled, set(g["model"]), rule, int(steps), nll)
        rows.append(row | {"ce_sampled": ce, "ce_sampled_hw": hw, "n_samples": n})
    return pd.DataFrame(rows)


def _cells(r: pd.Series) -> tuple:
    def ms(c: str) -> str:
        if r[c] == math.inf:
            return "∞"
        return fmt_mean_std(r[c], r[c + "_std"], int(r["n"]), "nats/token")

    sampled = DASH if not math.isfinite(r["ce_sampled"]) else f"{r['ce_sampled']:.3f} ± {r['ce_sampled_hw']:.3f}"
    return (r["source"], r["label"], r["rule"], str(r["steps"]), str(r["n"]), ms("law_kl_qp"), ms("law_kl_pq"),
            ms("law_entropy_gap"), ms("law_ce_excess"), sampled, ms("split_path_kl"), ms("split_factorization"),
            ms("split_per_position"))  # fmt: skip


def exact_law_table(study: Study) -> Table:
    """The exact output laws' divergences and the trajectory split, as a Table."""
    frame = exact_law_frame(study)
    columns = ("source", "method", "rule", "steps", "n models", "KL(q‖p) ↓", "KL(p‖q) ↓", "H(q) − H(p)",
               "CE excess (law)", "CE excess (samples, 95%)", "trajectory KL ↓", "factorization",
               "per-position ↓")  # fmt: skip
    cells, sections = [], []
    if not frame.empty:
        frame = frame.sort_values(["source", "steps"], kind="stable").reset_index(drop=True)
        cells = [_cells(r) for _, r in frame.iterrows()]
        sections = [i for i in range(1, len(frame)) if frame["steps"][i] != frame["steps"][i - 1]]
    notes = (
        "Per token (nats / L), of the sampler's exact output law q (enumerated over every state) against the source "
        "p; mean ± std over the training seeds (n models). CE excess (law) = KL(q‖p) + H(q) − H(p): the value "
        "oracle_nll − H_L estimates; CE excess (samples): that estimate from the study's samples of the same "
        "setting, ± the 95% half-width of the pooled per-sample values (the two agree where both are right).",
        "Trajectory KL: the sum over the grid's steps of E KL(J‖∏Q_i) along the true path (J the exact step, Q_i "
        "the sampler's per-position kernels; ≥ KL(p‖q) by data processing) = factorization (the exact step's total "
        "correlation: no product sampler removes it on this grid) + per-position (the rule's discretization and the "
        "model's error). A Monte-Carlo mean over states x_t (standard errors in the records); — where not computed "
        "(budgets above split_max_steps, or a grid ending before t = 1).",
    )
    return Table(
        name="table_exact_law",
        title=f"{study.name}: true divergences of each sampler's output law, beside its CE excess",
        columns=columns,
        cells=tuple(cells),
        bold=tuple(tuple(False for _ in columns) for _ in cells),
        sections=tuple(sections),
        notes=notes if cells else (),
        numbers=frame,
        n_label_columns=4,
    )
