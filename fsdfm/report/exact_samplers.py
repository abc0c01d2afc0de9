"""Which sampler removes how much of the exact denoiser's few-step error (oracle studies that drive several samplers
with the exact denoiser).

With the exact posterior p(x_1 | x_t) as the denoiser, a sampler's whole error is its own: for sampler s (update
rule and knobs) at budget N, its CE excess is

    e_s(N) = E[oracle_nll of its samples] - H_L              (nats/token; H_L the source's expected NLL)

estimated from the per-sample values pooled over the runs, SE = std / sqrt(n). Against the path's base sampler b
(its first exact setting without knobs, e.g. MDLM ancestral under the mask source):

    removed(s, N) = e_b(N) - e_s(N),    share removed = removed / e_b(N)

with Welch's 95% interval over the two sets of samples and a two-sided p, Holm-adjusted over every (s, N) compared
in the study (one family). Exact runs of a study share its sampling seed, so two samplers' samples are drawn from
common random numbers and positively correlated: Welch's unpaired interval is then conservative (wider than a
paired one), never anti-conservative. A negative `removed` means the sampler adds error. These are cross-entropy differences
(see `fsdfm.report.oracle`), not divergences: E_q[-log p] / L - H_L = KL(q || p) / L - (H(p) - H(q)) / L, so a CE
excess whose interval lies below 0 proves the sampler's law is sharper than the source (H(q) < H(p)); such a row is
flagged "below H_L" and never credited with removing error, and the samples' entropy beside it (minus the data's)
shows the sharpening.

Reads the runs and per-sample values of the study (`fsdfm.report.oracle.annotated_runs` finds the exact rows from
the plan); knows nothing about how the samplers work.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fsdfm.report.oracle import EXACT_KIND, annotated_runs, path_source
from fsdfm.report.significance import holm, welch
from fsdfm.report.summary import Study
from fsdfm.report.table import DASH, Table

__all__ = ["exact_samplers_frame", "exact_samplers_table"]

Z95 = 1.959963984540054  # the normal 97.5% quantile: the samples are hundreds per setting


def _per_sample(study: Study, metric: str) -> dict:
    """{run_id: (n,) float values of `metric`} from the study's per-sample table, read once ({} without it)."""
    s = study.samples
    if s is None or not len(s) or metric not in s:
        return {}
    v = pd.to_numeric(s[metric], errors="coerce")
    return {rid: g.dropna().to_numpy(dtype=float) for rid, g in v.groupby(s["run_id"], sort=False)}


def _pooled(by_run: dict, run_ids) -> np.ndarray:
    parts = [by_run[r] for r in run_ids if r in by_run]
    return np.concatenate(parts) if parts else np.array([])


def _data_entropy(study: Study) -> float:
    d = study.data
    return float(pd.to_numeric(d["entropy_nats"], errors="coerce").mean()) if "entropy_nats" in d else math.nan


def _settings(study: Study) -> pd.DataFrame:
    """The exact runs grouped by (path, label, rule, knobs, steps), in plan order, with their pooled per-sample
    oracle_nll values and H_L."""
    runs = annotated_runs(study)
    if runs.empty or not (runs["kind"] == EXACT_KIND).any():
        return pd.DataFrame()
    runs = runs[runs["kind"] == EXACT_KIND].assign(
        _knobs=runs["knobs"].fillna("").astype(str) if "knobs" in runs else "", _path=runs["path"].fillna("?")
    )
    nll, entropy = _per_sample(study, "oracle_nll"), _per_sample(study, "entropy_nats")
    rows = []
    for (path, label, rule, knobs, steps), g in runs.groupby(
        ["_path", "label", "rule", "_knobs", "steps"], sort=False, dropna=False
    ):
        e = _pooled(entropy, g["run_id"])
        rows.append({"path": path, "label": label, "rule": rule, "knobs": knobs, "steps": int(steps),
                     "values": _pooled(nll, g["run_id"]), "entropy": float(e.mean()) if len(e) else math.nan,
                     "h_l": float(pd.to_numeric(g["oracle_expected_nll"], errors="coerce").mean())})  # fmt: skip
    return pd.DataFrame(rows)


def exact_samplers_frame(study: Study) -> pd.DataFrame:
    """One row per exact (path, sampler, steps): n samples, ce_excess with its 95% CI, the path's base sampler,
    removed (base - this) with Welch's 95% CI, share_removed, p and p_holm. Empty unless some path has two or more
    exact samplers."""
    settings = _settings(study)
    if settings.empty:
        return pd.DataFrame()
    rows, h_data = [], _data_entropy(study)
    for path, g in settings.groupby("path", sort=False):
        samplers = list(dict.fromkeys(zip(g["label"], g["rule"], g["knobs"])))
        if len(samplers) < 2:
            continue
        base = next((s for s in samplers if s[2] == ""), samplers[0])
        at_base = g[(g["label"] == base[0]) & (g["rule"] == base[1]) & (g["knobs"] == base[2])]
        base_by_steps = {int(b["steps"]): b for _, b in at_base.iterrows()}
        for _, r in g.iterrows():
            v = r["values"]
            n = len(v)
            e = float(v.mean()) - r["h_l"] if n else math.nan
            se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            row = {"source": path_source(path), "label": r["label"], "rule": r["rule"], "knobs": r["knobs"],
                   "steps": r["steps"], "n": n, "ce_excess": e, "ce_excess_lo": e - Z95 * se,
                   "ce_excess_hi": e + Z95 * se, "base": base[0], "removed": math.nan, "removed_lo": math.nan,
                   "removed_hi": math.nan, "share_removed": math.nan, "p": math.nan,
                   "below_h": bool(e + Z95 * se < 0), "entropy_minus_data": r["entropy"] - h_data}  # fmt: skip
            is_base = (r["label"], r["rule"], r["knobs"]) == base
            b = base_by_steps.get(int(r["steps"]))
            if not is_base and b is not None and n > 1 and len(b["values"]) > 1:
                w = welch(b["values"], v)  # base - this: positive = error removed
                eb = float(b["values"].mean()) - float(b["h_l"])
                row.update(removed=w.diff, removed_lo=w.ci[0], removed_hi=w.ci[1], p=w.p,
                           share_removed=w.diff / eb if eb > 0 and not row["below_h"] else math.nan)  # fmt: skip
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"] = holm(df["p"].tolist())
    return df


def _cells(r: pd.Series) -> tuple:
    def ci(m, lo, hi):
        return DASH if not math.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    removed = (
        "base"
        if r["label"] == r["base"] and not math.isfinite(r["removed"])
        else ci(r["removed"], r["removed_lo"], r["removed_hi"])
    )
    share = f"{100 * r['share_removed']:.0f}%" if math.isfinite(r["share_removed"]) else DASH
    if r["below_h"]:
        share = "below H_L: sharper than the source"
    dh = DASH if not math.isfinite(r["entropy_minus_data"]) else f"{r['entropy_minus_data']:+.3f}"
    p = DASH if not math.isfinite(r["p_holm"]) else (f"{r['p_holm']:.3f}" if r["p_holm"] >= 0.001 else "<0.001")
    sampler = r["label"] + (f" ({r['knobs']})" if r["knobs"] and r["knobs"] not in r["label"] else "")
    return (r["source"], sampler, r["rule"], str(r["steps"]), str(r["n"]),
            ci(r["ce_excess"], r["ce_excess_lo"], r["ce_excess_hi"]), dh, removed, share, p)  # fmt: skip


def exact_samplers_table(study: Study) -> Table:
    """The exact samplers' own error and what each removes against the base sampler, as a Table."""
    frame = exact_samplers_frame(study)
    columns = ("source", "sampler (exact denoiser)", "rule", "steps", "n samples", "CE excess [95% CI]",
               "entropy − data (nats)", "removed vs base [95% CI] ↑", "share removed", "p (Holm)")  # fmt: skip
    if frame.empty:
        cells, sections = [], []
    else:
        frame = frame.sort_values(["source", "steps"], kind="stable").reset_index(drop=True)
        cells = [_cells(r) for _, r in frame.iterrows()]
        sections = [i for i in range(1, len(frame)) if frame["steps"][i] != frame["steps"][i - 1]]
    bold = []
    for i, _ in enumerate(cells):
        r = frame.iloc[i]
        base_ce = r["ce_excess"] + r["removed"]  # e_b = e_s + removed: a base below H_L has no error to remove
        sig = (
            math.isfinite(r["p_holm"]) and r["p_holm"] < 0.05 and r["removed"] > 0 and not r["below_h"] and base_ce > 0
        )
        bold.append(tuple(sig and j == 7 for j in range(len(columns))))
    notes = (
        "CE excess: mean oracle_nll of the sampler's samples (driven by the exact posterior) minus H_L, nats/token; "
        "its whole few-step error is the sampler's. 95% CI from the pooled per-sample values (normal). Not a "
        'divergence: below 0 ("below H_L") the sampler\'s law is provably sharper than the source, not better; '
        "entropy − data: the samples' mean per-sample entropy minus the data row's.",
        "removed vs base: the base sampler's CE excess minus this one's (the base is the path's first exact setting "
        "without knobs), Welch's 95% CI over the samples (conservative: the samplers share the sampling seed); share = "
        "removed / base CE excess. Bold: removes error, "
        "significant at 0.05 after Holm's correction over every comparison in this table, and not below H_L.",
    )
    return Table(
        name="table_exact_samplers",
        title=f"{study.name}: each sampler's own error, driven by the exact denoiser",
        columns=columns,
        cells=tuple(cells),
        bold=tuple(bold),
        sections=tuple(sections),
        notes=notes if cells else (),
        numbers=frame,
        n_label_columns=4,
    )
