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
import fsdfm.report.significance as significance
from fsdfm.report.published import published_tables
from fsdfm.report.summary import (
    DATA_KIND, DEFAULT_BY, POS_KIND, SAMPLING_WALL_S, Study, metric_info, present, summarize,
)
from fsdfm.report.table import (
    DASH, MAUVE_MIN_N, TIE, UNRELIABLE, Table, display_unit, fmt_mean_std, fmt_number, header,
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


# ------------------------------------------------------------------------------------------------ builders
def _order(summary: pd.DataFrame, by: Sequence[str], first: set = frozenset()) -> pd.DataFrame:
    """Settings in display order: those whose key (as `_key` strings) is in `first` (the data reference) lead,
    then labels and rules by first appearance, steps ascending."""
    settings = summary[list(by)].drop_duplicates().reset_index(drop=True)
    if settings.empty:
        return settings
    key = pd.DataFrame({"_lead": [0 if _key(r) in first else 1 for r in settings.itertuples(index=False)]})
    for i, col in enumerate(by):
        values = settings[col].astype(object).where(settings[col].notna(), None)
        if col == "steps":
            key[f"_r{i}"] = pd.to_numeric(settings[col], errors="coerce").astype(float)
        else:
            key[f"_r{i}"] = values.map({v: j for j, v in enumerate(dict.fromkeys(values))})
    order = key.sort_values(list(key.columns), na_position="first", kind="stable").index
    return settings.loc[order].reset_index(drop=True)


def best_rows(means: dict, metric: str) -> list:
    """Keys of `means` ({row: mean}) holding the best value of `metric` by its direction, compared at the
    displayed precision. None for a metric without a direction, for fewer than two rows, or when every row
    ties (marking them all would say nothing)."""
    direction = metric_info(metric).direction
    if direction is None or len(means) < 2:
        return []
    div, unit = display_unit(metric)
    shown = {i: float(fmt_number(v / div, unit)) for i, v in means.items()}
    best = min(shown.values()) if direction == "min" else max(shown.values())
    winners = [i for i, v in shown.items() if v == best]
    return winners if len(winners) < len(shown) else []


def _key(values) -> tuple:
    return tuple(_cell(v) for v in values)


def _cell(v) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return DASH
    return str(v)


def _flag_text(flags: dict) -> str:
    words = [w for k, w in (("collapse_entropy", "low entropy"), ("collapse_rep", "high rep_n")) if flags.get(k)]
    return ", ".join(words) if words else "no"


def _mauve_n(runs: pd.DataFrame) -> pd.Series:
    """MAUVE's samples per side of each run: the recorded `mauve_n`, else the run's `n_samples` (NaN if neither)."""
    n = pd.Series(math.nan, index=runs.index, dtype=float)
    for col in ("n_samples", "mauve_n"):
        if col in runs:
            n = pd.to_numeric(runs[col], errors="coerce").where(lambda v: v.notna(), n)
    return n


def metric_table(runs: pd.DataFrame, metrics: Sequence[str], *, name: str, title: str,
                 by: Sequence[str] = DEFAULT_BY, flags: bool = True, published: Sequence[str] = (),
                 extra_notes: Sequence[str] = (), samples: pd.DataFrame | None = None,
                 mauve_min_n: int = MAUVE_MIN_N) -> Table:
    """A "mean ± std" table of `metrics` per setting of `runs` (data row first if `runs` has one).

    runs: run table with a `kind` column ("data" marks the reference row). Metrics `runs` has no number for
    are left out and named in the notes. flags: add the collapse column. published: keys of
    `fsdfm.report.published.PUBLISHED` to append as a separate, labelled block.
    samples: per-sample table (`fsdfm.records.load_samples`) joined to `runs` by run_id: the values a best mark
    is tested on where a setting has a single seed. mauve_min_n: MAUVE with fewer samples per side is
    footnoted unreliable and never marked.
    """
    by = list(by)
    wanted = list(metrics)
    metrics = present(runs, wanted)
    summary = summarize(runs, by, metrics)
    is_data = runs["kind"].eq(DATA_KIND) if "kind" in runs else pd.Series(False, index=runs.index)
    data_keys = {_key(r) for r in runs.loc[is_data, by].itertuples(index=False)}
    settings = _order(summary, by, data_keys)
    pub = published_tables(published)
    notes = list(extra_notes)
    skipped = [m for m in wanted if m not in metrics]
    if skipped:
        notes.append(f"not recorded in this study: {', '.join(skipped)}")
    # a published value in a column we do not have adds the column (in the order of `wanted`)
    pub_metrics = {m for _, ptab in pub for row in ptab.rows for m in row.values}
    metrics = [m for m in dict.fromkeys(wanted + sorted(pub_metrics)) if m in metrics or m in pub_metrics]

    stats = {(_key(r[c] for c in by), r["metric"]): r for _, r in summary.iterrows()}  # (setting, metric) -> row
    keys = [_key(s) for s in settings.itertuples(index=False)]
    data_rows = [i for i, k in enumerate(keys) if k in data_keys]
    data_means = {}
    if data_rows:
        data_means = {m: stats[(keys[data_rows[0]], m)]["mean"] for m in metrics if (keys[data_rows[0]], m) in stats}

    columns = ["method" if c == "label" else c for c in by] + ["n"] + [header(m) for m in metrics]
    flag_col = flags and any(m in metrics for m in ("entropy_nats", "rep_n"))
    if flag_col:
        columns.append("collapse")
    if flags and not flag_col:
        notes.append("collapse flags need entropy_nats or rep_n; neither was recorded")
    if flag_col and not data_rows:
        notes.append("no data reference row: collapse flags cannot be computed (n/a)")

    from fsdfm.metrics import collapse_flags  # here, not at the top: fsdfm.metrics imports torch

    cells, numbers = [], []
    for i, key in enumerate(keys):
        row_stats = {m: stats.get((key, m)) for m in metrics}
        ns = sorted({int(s["n"]) for s in row_stats.values() if s is not None})
        n_text = DASH if not ns else (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")
        row = list(key) + [n_text]
        num = dict(zip(by, settings.iloc[i].tolist()))
        num["published"] = False
        for m in metrics:
            s = row_stats[m]
            if s is None:
                row.append(DASH)
                continue
            div, unit = display_unit(m)
            row.append(fmt_mean_std(s["mean"] / div, s["std"] / div, int(s["n"]), unit))
            num.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"], f"{m}_ci95": s["ci95"], f"{m}_n": int(s["n"])})
        if flag_col:
            if i in data_rows:
                row.append(DASH)
            elif not data_rows:
                row.append("n/a")
            else:
                means = {m: s["mean"] for m, s in row_stats.items() if s is not None}
                fl = collapse_flags(means, data_means)
                row.append(_flag_text(fl))
                num.update(fl)
        cells.append(row)
        numbers.append(num)

    bold = [[False] * len(columns) for _ in cells]
    offset = len(by) + 1
    run_settings = runs[by].copy()
    if "steps" in run_settings:  # as `summarize` keys them (8, not 8.0, when the data row's steps is missing)
        run_settings["steps"] = pd.to_numeric(run_settings["steps"], errors="coerce").astype("Int64")
    setting_of = [_key(r) for r in run_settings.itertuples(index=False)]
    per_setting_samples: dict = {}
    if samples is not None and len(samples) and "run_id" in runs and "run_id" in samples:
        run_key = dict(zip(runs["run_id"], setting_of))
        keyed = samples.assign(_setting=samples["run_id"].map(run_key)).dropna(subset=["_setting"])
        per_setting_samples = {k: g for k, g in keyed.groupby("_setting", sort=False)}
    mauve_n: dict = {}
    if "mauve" in metrics:
        for k, n in zip(setting_of, _mauve_n(runs)):
            if n == n:
                mauve_n[k] = min(mauve_n.get(k, n), n)
    unreliable = {i for i, k in enumerate(keys) if k in mauve_n and mauve_n[k] < mauve_min_n}
    tests_used: dict[str, list[str]] = {"seeds": [], "samples": []}
    untestable: list[str] = []
    for j, m in enumerate(metrics):
        if m == "mauve":
            for i in unreliable:
                cells[i][offset + j] += UNRELIABLE
        div, unit = display_unit(m)
        cands = []
        for i, key in enumerate(keys):
            if i in data_rows or (key, m) not in stats or (m == "mauve" and i in unreliable):
                continue
            seeds = pd.to_numeric(runs.loc[[k == key for k in setting_of], m], errors="coerce").dropna().to_numpy(float)
            cands.append(significance.Candidate(i, seeds, significance.per_sample_values(per_setting_samples.get(key), m)))
        marks = significance.mark_best(m, cands, data_means.get(m), shown=lambda v, d=div, u=unit: fmt_number(v / d, u))
        for i in marks.best:
            bold[i][offset + j] = True
        for i in marks.tied:
            cells[i][offset + j] += f" {TIE}"
        if marks.test:
            tests_used[marks.test].append(m)
        if marks.untestable:
            untestable.append(m)
    target = [m for m in metrics if significance.is_data_target(m)]

    sections = []
    if data_rows and len(cells) > len(data_rows):
        sections.append(len(data_rows))
    if pub:
        sections.append(len(cells))
        for key_, ptab in pub:
            notes.append(f"published ({key_}): {ptab.source}, {ptab.dataset}: {ptab.convention}. Paper-scale "
                         "reference numbers, not comparable in absolute terms with this study.")
            for prow in ptab.rows:
                lab = {"label": ptab.label(prow), "steps": prow.steps}
                row = [_cell(lab.get(c)) for c in by] + [DASH]
                num = {**{c: lab.get(c) for c in by}, "published": True}
                for m in metrics:
                    v = prow.values.get(m)
                    row.append(DASH if v is None else str(v))  # as published, not re-rounded
                    if v is not None:
                        num[f"{m}_mean"] = v
                if flag_col:
                    row.append(DASH)
                cells.append(row)
                bold.append([False] * len(columns))
                numbers.append(num)
    head = ("cells: mean ± std over seeds (runs sharing method, rule and steps); n = seeds"
            if any(int(s["n"]) > 1 for s in stats.values()) else "cells: one seed per setting (no spread)")
    marks_note = [f"{head}; bold: best in its column, only where its difference from the runner-up is significant "
                  f"(Welch t-test, p < {significance.ALPHA:g}; data and published rows excluded); "
                  f"{TIE}: tied with the best (difference not significant)"]
    if tests_used["seeds"]:
        marks_note.append(f"tested across seeds: {', '.join(tests_used['seeds'])}")
    if tests_used["samples"]:
        marks_note.append("tested across per-sample values (fewer than 2 seeds): " + ", ".join(
            f"{m} ({significance.PER_SAMPLE_VALUES[m][2]})" for m in tests_used["samples"]))
    if untestable:
        marks_note.append(f"not marked, no test possible (one seed and no per-sample values): {', '.join(untestable)}")
    if target:
        marks_note.append(f"ranked by distance to the data row (→ data), not by direction: {', '.join(target)}")
    if unreliable:
        ns = sorted({int(mauve_n[keys[i]]) for i in unreliable})
        marks_note.append(f"{UNRELIABLE} MAUVE unreliable, n = {', '.join(map(str, ns))} samples per side "
                          f"(< {mauve_min_n}): shown, never marked best")
    notes[0:0] = marks_note
    return Table(name=name, title=title, columns=tuple(columns), cells=tuple(tuple(r) for r in cells),
                 bold=tuple(tuple(b) for b in bold), sections=tuple(sections), notes=tuple(notes),
                 numbers=pd.DataFrame(numbers).convert_dtypes(), n_label_columns=len(by))


# ------------------------------------------------------------------------------------- the study's tables
def _n_samples_note(runs: pd.DataFrame) -> list[str]:
    if "n_samples" not in runs:
        return []
    ns = sorted({int(v) for v in pd.to_numeric(runs["n_samples"], errors="coerce").dropna()})
    return [f"samples per run: {', '.join(map(str, ns))}"] if ns else []


def main_table(study: Study, published: Sequence[str] = (), metrics: Sequence[str] | None = None) -> Table:
    """Quality by method and step budget: perplexity, entropy, MAUVE, diversity; data row first; collapse."""
    metrics = main_metrics() if metrics is None else metrics
    runs = study.runs[study.runs["kind"] != POS_KIND] if "kind" in study.runs else study.runs
    return metric_table(runs, metrics, name="table_main", title=f"{study.name}: sample quality by method and step budget",
                        published=published, extra_notes=_n_samples_note(runs), samples=study.samples,
                        mauve_min_n=study.report_settings["mauve_min_n"])


def cost_table(study: Study) -> Table:
    """Sampling cost by method and step budget (no data row): NFE, sampling wall-clock, throughput, memory."""
    return metric_table(study.models, cost_metrics(), name="table_cost", flags=False,
                        title=f"{study.name}: sampling cost (evaluator time excluded)")


def pos_divergence_table(study: Study) -> Table:
    """Per-position divergence summaries (mean TV, agreement, TV slope) per student and step budget."""
    return metric_table(study.divergence, pos_metrics(), name="table_pos_divergence", flags=False,
                        title=f"{study.name}: few-step student vs many-step teacher, per-position divergence")


def seeds_table(study: Study, metrics: Sequence[str] | None = None) -> Table:
    """Run-to-run variance: per setting and metric, n seeds, mean, std, 95% CI, min, max, std/mean."""
    metrics = seed_metrics() if metrics is None else metrics
    runs = study.runs[study.runs["kind"] != POS_KIND] if "kind" in study.runs else study.runs
    wanted = list(metrics)
    s = summarize(runs, DEFAULT_BY, wanted)
    data_keys = {_key(r) for r in runs.loc[runs["kind"] == DATA_KIND, list(DEFAULT_BY)].itertuples(index=False)} \
        if "kind" in runs else set()
    order = _order(s, DEFAULT_BY, data_keys)
    s = order.merge(s, on=list(DEFAULT_BY), how="left").dropna(subset=["metric"])
    cells = []
    for _, r in s.iterrows():
        unit = metric_info(r["metric"]).unit
        cv = r["std"] / abs(r["mean"]) * 100 if r["mean"] and not pd.isna(r["std"]) else math.nan
        cells.append(tuple([_cell(r["label"]), _cell(r["rule"]), _cell(r["steps"]), r["metric"], str(int(r["n"]))]
                           + [fmt_number(r[k], unit, ref=r["mean"]) for k in ("mean", "std", "ci95", "min", "max")]
                           + [DASH if pd.isna(cv) else f"{cv:.1f}"]))
    skipped = [m for m in wanted if m not in set(s["metric"])]
    notes = ["std: sample standard deviation over seeds (ddof 1); ci95: Student-t 95% half-width "
             "t(0.975, n-1)·std/√n; cv: std/|mean| in %; — where n = 1"]
    if skipped:
        notes.append(f"not recorded in this study (left out): {', '.join(skipped)}")
    cols = ("method", "rule", "steps", "metric", "n", "mean", "std", "ci95", "min", "max", "cv %")
    return Table(name="table_seeds", title=f"{study.name}: run-to-run variance across seeds", columns=cols,
                 cells=tuple(cells), bold=tuple((False,) * len(cols) for _ in cells), sections=(),
                 notes=tuple(notes), numbers=s.reset_index(drop=True), n_label_columns=4)


def ablation_kinds(study: Study) -> dict[str, list[str]]:
    """Method kinds with several labels (variants) in the study: kind -> labels in order of appearance."""
    m = study.models
    if m.empty or "kind" not in m:
        return {}
    out = {k: list(dict.fromkeys(g["label"])) for k, g in m.groupby("kind", sort=False)}
    return {k: v for k, v in out.items() if len(v) > 1}


def ablation_tables(study: Study) -> list[Table]:
    """One quality table per method kind with several variants (data row first), every step budget."""
    out = []
    for kind, labels in ablation_kinds(study).items():
        runs = study.runs[(study.runs["kind"] == DATA_KIND) | (study.runs["kind"] == kind)]
        out.append(metric_table(runs, main_metrics() + ("nfe",), name=f"table_ablation_{kind}",
                                title=f"{study.name}: ablation of {kind} ({len(labels)} variants)",
                                samples=study.samples, mauve_min_n=study.report_settings["mauve_min_n"]))
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
            which = ", ".join(f"{r} ({int(s)} of {int(n)})" for r, s, n in
                              zip(short["run_id"], seen[short.index], made[short.index]))
            out.append(f"**{metric} saw fewer samples than the run made** in {len(short)} run(s): {which}")
    for metric in ("gen_ppl", "gen_ppl_seq_mean"):
        col = f"{metric}_n_truncated"
        if col in runs:
            k = pd.to_numeric(runs[col], errors="coerce")
            hit = runs[k > 0]
            if len(hit):
                which = ", ".join(f"{r} ({int(t)} of {int(n)})" for r, t, n in
                                  zip(hit["run_id"], k[hit.index], made[hit.index]))
                out.append(f"{metric} truncated samples longer than the evaluator's context in {len(hit)} run(s): "
                           f"{which}; their tails are not scored")
    return out


def summary_csv(study: Study) -> pd.DataFrame:
    """Every recorded metric of every setting, long format (`summarize` output) for machines."""
    return summarize(study.runs, DEFAULT_BY)


__all__ = ["Table", "main_metrics", "cost_metrics", "pos_metrics", "seed_metrics", "metric_table", "main_table",
           "sample_count_warnings", "cost_table", "pos_divergence_table", "seeds_table", "ablation_tables",
           "ablation_kinds", "summary_csv", "best_rows"]
