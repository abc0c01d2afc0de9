"""The generic metric table: one row per setting (label, rule, steps), "mean ± std" cells, the best value per
column marked only where significant, collapse flags, and published rows in their own block.

`metric_table` knows the marking rules (see `fsdfm.report.tables` for the list every table follows) and nothing
about which study tables exist or which metrics they show: `fsdfm.report.tables` builds the study's tables on it.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd


import fsdfm.report.significance as significance
from fsdfm.report.published import published_tables
from fsdfm.report.summary import (
    DATA_KIND,
    DEFAULT_BY,
    metric_info,
    present,
    summarize,
)
from fsdfm.report.table import (
    DASH,
    MAUVE_MIN_N,
    TIE,
    UNRELIABLE,
    Table,
    display_unit,
    fmt_mean_std,
    fmt_number,
    header,
)


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
    """ "collapsed: low entropy, high rep_n", "noisy: high entropy" (entropy above the data's), or "no"."""
    collapsed = [w for k, w in (("collapse_entropy", "low entropy"), ("collapse_rep", "high rep_n")) if flags.get(k)]
    parts = (["collapsed: " + ", ".join(collapsed)] if collapsed else []) + (
        ["noisy: high entropy"] if flags.get("noise_entropy") else []
    )
    return "; ".join(parts) if parts else "no"


def _mauve_n(runs: pd.DataFrame) -> pd.Series:
    """MAUVE's samples per side of each run: the recorded `mauve_n`, else the run's `n_samples` (NaN if neither)."""
    n = pd.Series(math.nan, index=runs.index, dtype=float)
    for col in ("n_samples", "mauve_n"):
        if col in runs:
            n = pd.to_numeric(runs[col], errors="coerce").where(lambda v: v.notna(), n)
    return n


def metric_table(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    *,
    name: str,
    title: str,
    by: Sequence[str] = DEFAULT_BY,
    flags: bool = True,
    published: Sequence[str] = (),
    extra_notes: Sequence[str] = (),
    samples: pd.DataFrame | None = None,
    mauve_min_n: int = MAUVE_MIN_N,
) -> Table:
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

    # the flags read entropy_nats and rep_n whether or not this table shows them
    flag_means: dict = {}
    for _, r in summarize(runs, by, present(runs, ("entropy_nats", "rep_n"))).iterrows():
        flag_means.setdefault(_key(r[c] for c in by), {})[r["metric"]] = r["mean"]
    cells, numbers = [], []
    flagged: set[int] = set()  # rows with a collapse or noise flag: shown, never marked best
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
        fl = {}
        if data_rows and i not in data_rows:  # flags decide the best marks even where no column shows them
            fl = collapse_flags(flag_means.get(key, {}), flag_means.get(keys[data_rows[0]], {}))
            if any(fl.values()):
                flagged.add(i)
        if flag_col:
            if i in data_rows:
                row.append(DASH)
            elif not data_rows:
                row.append("n/a")
            else:
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
            if i in data_rows or i in flagged or (key, m) not in stats or (m == "mauve" and i in unreliable):
                continue
            seeds = pd.to_numeric(runs.loc[[k == key for k in setting_of], m], errors="coerce").dropna().to_numpy(float)
            cands.append(
                significance.Candidate(i, seeds, significance.per_sample_values(per_setting_samples.get(key), m))
            )
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
            notes.append(
                f"published ({key_}): {ptab.source}, {ptab.dataset}: {ptab.convention}. Paper-scale "
                "reference numbers, not comparable in absolute terms with this study."
            )
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
    head = (
        "cells: mean ± std over seeds (runs sharing method, rule and steps); n = seeds"
        if any(int(s["n"]) > 1 for s in stats.values())
        else "cells: one seed per setting (no spread)"
    )
    marks_note = [
        f"{head}; bold: best in its column, only where its difference from the runner-up is significant "
        f"(Welch t-test, p < {significance.ALPHA:g}; data, published and flagged rows excluded); "
        f"{TIE}: tied with the best (difference not significant)"
    ]
    if tests_used["seeds"]:
        marks_note.append(f"tested across seeds: {', '.join(tests_used['seeds'])}")
    if tests_used["samples"]:
        marks_note.append(
            "tested across per-sample values (fewer than 2 seeds): "
            + ", ".join(f"{m} ({significance.PER_SAMPLE_VALUES[m][2]})" for m in tests_used["samples"])
        )
    if untestable:
        marks_note.append(f"not marked, no test possible (one seed and no per-sample values): {', '.join(untestable)}")
    if target:
        marks_note.append(f"ranked by distance to the data row (→ data), not by direction: {', '.join(target)}")
    if unreliable:
        ns = sorted({int(mauve_n[keys[i]]) for i in unreliable})
        marks_note.append(
            f"{UNRELIABLE} MAUVE unreliable, n = {', '.join(map(str, ns))} samples per side "
            f"(< {mauve_min_n}): shown, never marked best"
        )
    notes[0:0] = marks_note
    return Table(
        name=name,
        title=title,
        columns=tuple(columns),
        cells=tuple(tuple(r) for r in cells),
        bold=tuple(tuple(b) for b in bold),
        sections=tuple(sections),
        notes=tuple(notes),
        numbers=pd.DataFrame(numbers).convert_dtypes(),
        n_label_columns=len(by),
    )
