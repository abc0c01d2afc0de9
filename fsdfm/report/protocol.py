"""The evaluation-protocol table: one checkpoint, each row one convention switch away from the baseline.

Sampler switches are runs of the same model and budget with one knob changed (precision float32, top_p, greedy_tail;
the run whose knobs are empty is the baseline); scoring switches are metrics of the baseline's samples, each one
switch from another (gen_ppl -> gen_ppl_raw: re-tokenization; gen_ppl_raw -> gen_ppl_seq_mean: pooling; gen_ppl ->
gen_ppl_first_scored: the first token; gen_ppl -> gen_ppl_short_ctx: the evaluator's context). Each row gives the
value, the value it is compared with and their ratio (means over the runs of a setting).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fsdfm.report.table import Table

SCORING_SWITCHES = (
    ("raw ids instead of re-tokenized text", "gen_ppl_raw", "gen_ppl"),
    ("per-sample mean instead of token-pooled (raw ids)", "gen_ppl_seq_mean", "gen_ppl_raw"),
    ("first token scored (BOS prepended)", "gen_ppl_first_scored", "gen_ppl"),
    ("evaluator context a quarter of the sample", "gen_ppl_short_ctx", "gen_ppl"),
)
KNOB_SWITCH = {
    "precision=float32": "float32 draws instead of float64",
    "top_p": "nucleus on",
    "greedy_tail=True": "greedy tail on",
}


def _mean(df: pd.DataFrame, col: str) -> float:
    return float(pd.to_numeric(df[col], errors="coerce").mean()) if col in df else float("nan")


def protocol_table(runs: pd.DataFrame) -> Table:
    """Rows: (budget, switch, metric, value, compared with, ratio) for every budget with a knob-free baseline run."""
    rows, numbers = [], []
    if runs.empty or "gen_ppl" not in runs:
        runs = runs.iloc[:0]
    knobs = runs["knobs"] if "knobs" in runs else pd.Series([np.nan] * len(runs), index=runs.index)
    plain = knobs.isna() | (knobs.astype(str) == "")
    for steps in sorted(pd.to_numeric(runs.get("steps", pd.Series(dtype=float)), errors="coerce").dropna().unique()):
        at = runs[pd.to_numeric(runs["steps"], errors="coerce") == steps]
        base = at[plain.loc[at.index]]
        if base.empty:
            continue

        def add(switch, metric, value, ref_metric, ref):
            ratio = value / ref if ref and np.isfinite(ref) else float("nan")
            rows.append((f"{int(steps)}", switch, metric, f"{value:.2f}", f"{ref:.2f} ({ref_metric})", f"{ratio:.3f}"))
            numbers.append({"steps": int(steps), "switch": switch, "metric": metric, "value": value,
                            "reference": ref, "reference_metric": ref_metric, "ratio": ratio})  # fmt: skip

        b = _mean(base, "gen_ppl")
        add("baseline", "gen_ppl", b, "gen_ppl", b)
        for name, metric, ref in SCORING_SWITCHES:
            if metric in base and ref in base and np.isfinite(_mean(base, metric)):
                add(name, metric, _mean(base, metric), ref, _mean(base, ref))
        for k, g in at[~plain.loc[at.index]].groupby(knobs.loc[at.index][~plain.loc[at.index]]):
            name = next((v for key, v in KNOB_SWITCH.items() if str(k).startswith(key)), f"knobs {k}")
            add(f"{name} ({k})", "gen_ppl", _mean(g, "gen_ppl"), "gen_ppl", b)
    return Table(
        name="table_protocol",
        title="Evaluation-protocol audit: gen-PPL under each convention switch",
        columns=("steps", "switch (one at a time)", "metric", "value", "compared with", "ratio"),
        cells=tuple(rows),
        bold=tuple((False,) * 6 for _ in rows),
        sections=tuple(i for i, r in enumerate(rows) if r[1] == "baseline"),
        notes=("each row differs from the value it is compared with in exactly one convention; means over runs",),
        numbers=pd.DataFrame(numbers),
        n_label_columns=3,
    )
