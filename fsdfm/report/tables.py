"""Tables of a study: per-setting "mean ± std" cells, best value per column, collapse flags, published rows.

A `Table` holds display cells (plain strings), a bold mask and the raw numbers, and renders itself as
Markdown (tabulate, via DataFrame.to_markdown), LaTeX (booktabs tabular) and CSV (the numbers, not the
strings). Rules every table follows:

* the data reference row ("data (held-out)") comes first and is never marked best;
* a column is marked (bold) at the best row only when its difference from the runner-up is significant
  (`fsdfm.report.significance.mark_best`: Welch across seeds where both have >= 2, else across per-sample
  values; the note says which); rows tied with the best are marked "≈"; nothing is marked when every row
  ties, when the difference cannot be tested, or when only one row competes. Metrics whose target is the
  data (entropy, distinct-n, self-BLEU, rep-n) are ranked by distance to the data row, not by direction;
* MAUVE from fewer than `mauve_min_n` samples per side (default 256) is footnoted "†" (unreliable) and never
  marked;
* the collapse column uses `fsdfm.metrics.collapse_flags` of each row's means against the data row's;
* published rows (`fsdfm.report.published`) come last, in their own block, labelled "published: <source>".

The `Table` type and number formatting are `fsdfm.report.table`; the paired comparisons `fsdfm.report.pairs`.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from fsdfm.metrics.registry import shown
from fsdfm.report.metric_table import _cell, _key, _order, best_rows, metric_table  # noqa: F401 (re-exported)
from fsdfm.report.summary import (
    DATA_KIND,
    DEFAULT_BY,
    EXTERNAL_RUN_KIND,
    DIAGNOSTIC_KINDS,
    SANITY,
    SAMPLING_WALL_S,
    Study,
    metric_info,
    summarize,
)
from fsdfm.report.table import (
    DASH,
    Table,
    fmt_number,
)


# Which metrics each table shows, and in what order, is the metrics' own registry entry (`show`): a registered
# metric reaches its tables with no edit here. They are read when a table is built, not at import, so a metric
# registered later (a plug-in, a test) is shown too. Absent metrics are skipped.
def main_metrics() -> tuple[str, ...]:
    """The quality table's metrics: perplexity, entropy, MAUVE, diversity, oracle (registry view "main")."""
    return shown("main")


def cost_metrics() -> tuple[str, ...]:
    """The cost table's metrics (view "cost"); wall_s is shown as the `sampling_wall_s` column, which is the
    sampling stage's own wall-clock whatever the record layout (`fsdfm.report.summary.sampling_wall_s`)."""
    return tuple(SAMPLING_WALL_S if m == "wall_s" else m for m in shown("cost"))


def pos_metrics() -> tuple[str, ...]:
    """The per-position divergence table's metrics (view "pos"), with the stage's `pos_agreement` column second:
    a diagnostic the stage records next to its metrics, not a registered metric (registering it would add it to
    every summary of the study)."""
    pos = shown("pos")
    return pos[:1] + ("pos_agreement",) + pos[1:]


def seed_metrics() -> tuple[str, ...]:
    """The run-to-run variance table's metrics (view "seeds")."""
    return shown("seeds")


# ------------------------------------------------------------------------------------- the study's tables
def _n_samples_note(runs: pd.DataFrame) -> list[str]:
    if "n_samples" not in runs:
        return []
    ns = sorted({int(v) for v in pd.to_numeric(runs["n_samples"], errors="coerce").dropna()})
    return [f"samples per run: {', '.join(map(str, ns))}"] if ns else []


def main_table(study: Study, published: Sequence[str] = (), metrics: Sequence[str] | None = None) -> Table:
    """Quality by method and step budget: perplexity, entropy, MAUVE, diversity; data row first; collapse."""
    metrics = main_metrics() if metrics is None else metrics
    runs = study.runs[~study.runs["kind"].isin(DIAGNOSTIC_KINDS)] if "kind" in study.runs else study.runs
    return metric_table(
        runs,
        metrics,
        name="table_main",
        title=f"{study.name}: sample quality by method and step budget",
        published=published,
        extra_notes=_n_samples_note(runs),
        samples=study.samples,
        mauve_min_n=study.report_settings["mauve_min_n"],
        asked=study.asked_metrics,
    )


LOADED = "‡"
LOAD_LIMIT = 1.0  # load average per usable core above which a timing competed for the cores


def cost_table(study: Study) -> Table:
    """Sampling cost by method and step budget (no data row): NFE, sampling wall-clock, throughput, memory.
    Timings taken under load (the sample stage's `load_per_core` > LOAD_LIMIT) are marked ‡ and never bold."""
    t = metric_table(
        study.models,
        cost_metrics(),
        name="table_cost",
        flags=False,
        title=f"{study.name}: sampling cost (evaluator time excluded)",
    )
    return mark_loaded(t, study.models)


def mark_loaded(t: Table, runs: pd.DataFrame) -> Table:
    """`t` with ‡ on the time columns of each setting whose runs were timed at load_per_core > LOAD_LIMIT (the
    worst run counts), and a note; 9c2f443 showed the same network's 8 steps at 8.33 s and 2.44 s with nothing
    saying that load made the difference."""
    if t.empty or "load_per_core" not in runs or "label" not in t.numbers:
        return t
    load = pd.to_numeric(runs["load_per_core"], errors="coerce")
    by = [c for c in DEFAULT_BY if c in runs]

    def norm(v) -> str:  # one spelling of a setting's key in the run table and in the table's numbers
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return ""
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    keys = pd.Series(["|".join(norm(v) for v in r) for r in runs[by].itertuples(index=False)], index=runs.index)
    worst = load.groupby(keys).max()
    time_cols = [i for i, c in enumerate(t.columns) if c.startswith(("sampling_wall_s", "tokens_per_s"))]
    cells, bold, hit = [list(r) for r in t.cells], [list(b) for b in t.bold], []
    nums = t.numbers
    for i in range(len(cells)):
        key = "|".join(norm(nums.iloc[i][c]) if c in nums else "" for c in by)
        w = worst.get(key)
        if w is not None and w == w and w > LOAD_LIMIT:
            hit.append(float(w))
            for j in time_cols:
                cells[i][j] += f" {LOADED}"
                bold[i][j] = False
    if not hit:
        return t
    note = (
        f"{LOADED} timed under load: load average up to {max(hit):.1f} per usable core (> {LOAD_LIMIT:g}); the "
        "wall-clock includes waiting for cores other jobs held (compare cpu_s in the run table), so it is not the "
        "method's own and is never marked best"
    )
    import dataclasses

    return dataclasses.replace(t, cells=tuple(map(tuple, cells)), bold=tuple(map(tuple, bold)), notes=(*t.notes, note))


def pos_divergence_table(study: Study) -> Table:
    """Per-position divergence summaries (mean TV, agreement, TV slope) per student and step budget."""
    return metric_table(
        study.divergence,
        pos_metrics(),
        name="table_pos_divergence",
        flags=False,
        title=f"{study.name}: few-step student vs many-step teacher, per-position divergence",
    )


def seeds_table(study: Study, metrics: Sequence[str] | None = None) -> Table:
    """Run-to-run variance: per setting and metric, n seeds, mean, std, 95% CI, min, max, std/mean."""
    metrics = seed_metrics() if metrics is None else metrics
    runs = study.runs[~study.runs["kind"].isin(DIAGNOSTIC_KINDS)] if "kind" in study.runs else study.runs
    wanted = list(metrics)
    s = summarize(runs, DEFAULT_BY, wanted)
    data_keys = (
        {_key(r) for r in runs.loc[runs["kind"] == DATA_KIND, list(DEFAULT_BY)].itertuples(index=False)}
        if "kind" in runs
        else set()
    )
    order = _order(s, DEFAULT_BY, data_keys)
    s = order.merge(s, on=list(DEFAULT_BY), how="left").dropna(subset=["metric"])
    cells = []
    for _, r in s.iterrows():
        unit = metric_info(r["metric"]).unit
        cv = r["std"] / abs(r["mean"]) * 100 if r["mean"] and not pd.isna(r["std"]) else math.nan
        cells.append(
            tuple(
                [_cell(r["label"]), _cell(r["rule"]), _cell(r["steps"]), r["metric"], str(int(r["n"]))]
                + [fmt_number(r[k], unit, ref=r["mean"]) for k in ("mean", "std", "ci95", "min", "max")]
                + [DASH if pd.isna(cv) else f"{cv:.1f}"]
            )
        )
    asked = study.asked_metrics
    skipped = [m for m in wanted if m not in set(s["metric"]) and (asked is None or m in asked)]
    notes = [
        "std: sample standard deviation over seeds (ddof 1); ci95: Student-t 95% half-width "
        "t(0.975, n-1)·std/√n; cv: std/|mean| in %; — where n = 1"
    ]
    if skipped:
        notes.append(f"not recorded in this study (left out): {', '.join(skipped)}")
    cols = ("method", "rule", "steps", "metric", "n", "mean", "std", "ci95", "min", "max", "cv %")
    return Table(
        name="table_seeds",
        title=f"{study.name}: run-to-run variance across seeds",
        columns=cols,
        cells=tuple(cells),
        bold=tuple((False,) * len(cols) for _ in cells),
        sections=(),
        notes=tuple(notes),
        numbers=s.reset_index(drop=True),
        n_label_columns=4,
    )


def ablation_kinds(study: Study) -> dict[str, list[str]]:
    """Method kinds with several labels (variants) in the study: kind -> labels in order of appearance."""
    m = study.models
    if m.empty or "kind" not in m:
        return {}
    m = m[m["kind"] != EXTERNAL_RUN_KIND]  # scored files from elsewhere are rows, not variants of one method
    if SANITY in m:  # model-free sanity rows (one per rule) are not variants of a method either
        m = m[~m[SANITY].eq(True)]
    out = {k: list(dict.fromkeys(g["label"])) for k, g in m.groupby("kind", sort=False)}
    return {k: v for k, v in out.items() if len(v) > 1}


def ablation_tables(study: Study) -> list[Table]:
    """One quality table per method kind with several variants (data row first), every step budget."""
    out = []
    for kind, labels in ablation_kinds(study).items():
        runs = study.runs[(study.runs["kind"] == DATA_KIND) | (study.runs["kind"] == kind)]
        out.append(
            metric_table(
                runs,
                main_metrics() + ("nfe",),
                name=f"table_ablation_{kind}",
                title=f"{study.name}: ablation of {kind} ({len(labels)} variants)",
                samples=study.samples,
                mauve_min_n=study.report_settings["mauve_min_n"],
                asked=study.asked_metrics,
            )
        )
    return out


def sample_count_warnings(study: Study) -> list[str]:
    """Where a metric saw fewer samples than its run made, and where gen_ppl truncated samples (longer than the
    evaluator's context), one line per metric with the runs it concerns."""
    runs = study.runs
    out = []
    if "n_samples" not in runs:
        return out
    made = pd.to_numeric(runs["n_samples"], errors="coerce")
    for col in [c for c in runs.columns if c.startswith("samples_per_metric.")]:
        seen = pd.to_numeric(runs[col], errors="coerce")
        short = runs[(seen < made) & seen.notna()]
        if len(short):
            metric = col.split(".", 1)[1]
            which = ", ".join(
                f"{r} ({int(s)} of {int(n)})" for r, s, n in zip(short["run_id"], seen[short.index], made[short.index])
            )
            out.append(f"**{metric} saw fewer samples than the run made** in {len(short)} run(s): {which}")
    for metric in ("gen_ppl", "gen_ppl_seq_mean"):
        col = f"{metric}_n_truncated"
        if col in runs:
            k = pd.to_numeric(runs[col], errors="coerce")
            hit = runs[k > 0]
            if len(hit):
                which = ", ".join(
                    f"{r} ({int(t)} of {int(n)})" for r, t, n in zip(hit["run_id"], k[hit.index], made[hit.index])
                )
                out.append(
                    f"{metric} truncated samples longer than the evaluator's context in {len(hit)} run(s): "
                    f"{which}; their tails are not scored"
                )
    return out


def summary_csv(study: Study) -> pd.DataFrame:
    """Every recorded metric of every setting, long format (`summarize` output) for machines."""
    return summarize(study.runs, DEFAULT_BY)


__all__ = [
    "Table",
    "main_metrics",
    "cost_metrics",
    "pos_metrics",
    "seed_metrics",
    "metric_table",
    "main_table",
    "sample_count_warnings",
    "cost_table",
    "pos_divergence_table",
    "seeds_table",
    "ablation_tables",
    "ablation_kinds",
    "summary_csv",
    "best_rows",
]
