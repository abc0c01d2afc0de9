"""The generic metric table: one row per setting (label, rule, steps), "mean ± std" cells, the best value per
column marked only where significant, collapse flags, and published rows in their own block.

`metric_table` knows the marking rules (see `fsdfm.report.tables` for the list every table follows) and nothing
about which study tables exist or which metrics they show: `fsdfm.report.tables` builds the study's tables on it.
"""

from __future__ import annotations

import math
from typing import Collection, Sequence

import pandas as pd


import fsdfm.report.significance as significance
from fsdfm.report.published import published_tables
from fsdfm.report.summary import (
    DATA_KIND,
    SANITY,
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
    asked: Collection[str] | None = None,
) -> Table:
    """A "mean ± std" table of `metrics` per setting of `runs` (data row first if `runs` has one).

    runs: run table with a `kind` column ("data" marks the reference row). Metrics `runs` has no number for
    are left out and named in the notes. flags: add the collapse column. published: keys of
    `fsdfm.report.published.PUBLISHED` to append as a separate, labelled block.
    samples: per-sample table (`fsdfm.records.load_samples`) joined to `runs` by run_id: the values a best mark
    is tested on where a setting has a single seed. mauve_min_n: MAUVE with fewer samples per side is
    footnoted unreliable and never marked. asked: `Study.asked_metrics`; only these are named as not recorded.
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
    skipped = [m for m in wanted if m not in metrics and (asked is None or m in asked)]
    if skipped:
        notes.append(f"not recorded in this study: {', '.join(skipped)}")
    # a published value in a column we do not have adds the column (in the order of `wanted`)
    pub_metrics = {m for _, ptab in pub for row in ptab.rows for m in row.values}
    metrics = [m for m in dict.fromkeys(wanted + sorted(pub_metrics)) if m in metrics or m in pub_metrics]

    stats = {(_key(r[c] for c in by), r["metric"]): r for _, r in summary.iterrows()}  # (setting, metric) -> row
    keys = [_key(s) for s in settings.itertuples(index=False)]
    data_rows = [i for i, k in enumerate(keys) if k in data_keys]
    data_means = {
        m: stats[(keys[data_rows[0]], m)]["mean"] for m in metrics if data_rows and (keys[data_rows[0]], m) in stats
    }

    columns, flag_col = _columns(by, metrics, flags, bool(data_rows), notes)

    row_flags = _row_flags(runs, by, keys, data_rows)
    flagged = {i for i, f in row_flags.items() if any(f.values())}  # shown, never marked best
    cells, numbers = _setting_rows(keys, settings, by, metrics, stats, data_rows, row_flags, flag_col)
    bold = [[False] * len(columns) for _ in cells]
    setting_of = _setting_of(runs, by)
    unreliable = _unreliable_mauve(runs, setting_of, keys, metrics, mauve_min_n)
    sanity = _sanity_rows(runs, setting_of, keys)  # shown, never marked best
    if sanity:
        notes.append(
            "sanity rows (model-free samplers: "
            + ", ".join(dict.fromkeys(cells[i][0] for i in sorted(sanity)))
            + "): shown to expose which metric each one fools, never marked best"
        )
    excluded = set(data_rows) | flagged | sanity
    args = (runs, samples, setting_of, keys, metrics, stats, excluded, data_means, unreliable, cells, bold, len(by) + 1)
    marked = _mark(*args)
    sections = [len(data_rows)] if data_rows and len(cells) > len(data_rows) else []
    if pub:
        sections.append(len(cells))
        _add_published(pub, by, metrics, flag_col, cells, bold, numbers, notes, len(columns))
    notes[0:0] = _marks_note(stats, marked, metrics, unreliable, mauve_min_n)
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


def _setting_of(runs: pd.DataFrame, by: list) -> list:
    """Each run's setting key, as `summarize` keys them (8, not 8.0, when the data row's steps is missing)."""
    run_settings = runs[by].copy()
    if "steps" in run_settings:
        run_settings["steps"] = pd.to_numeric(run_settings["steps"], errors="coerce").astype("Int64")
    return [_key(r) for r in run_settings.itertuples(index=False)]


def _sanity_rows(runs: pd.DataFrame, setting_of: list, keys: list) -> set[int]:
    """Rows of the settings whose runs are sanity baselines (run parameter `sanity` true: `MethodKind.sanity`)."""
    if SANITY not in runs:
        return set()
    marked = {k for k, v in zip(setting_of, runs[SANITY].eq(True)) if v}
    return {i for i, k in enumerate(keys) if k in marked}


def _unreliable_mauve(runs: pd.DataFrame, setting_of: list, keys: list, metrics: list, mauve_min_n: int) -> dict:
    """{row: its fewest MAUVE samples per side} of the rows whose MAUVE has fewer than `mauve_min_n`."""
    mauve_n: dict = {}
    if "mauve" in metrics:
        for k, n in zip(setting_of, _mauve_n(runs)):
            if n == n:  # not NaN
                mauve_n[k] = min(mauve_n.get(k, n), n)
    return {i: int(mauve_n[k]) for i, k in enumerate(keys) if k in mauve_n and mauve_n[k] < mauve_min_n}


def _columns(by: list, metrics: list, flags: bool, has_data: bool, notes: list) -> tuple[list[str], bool]:
    """(the table's column headers, whether it has the collapse column); notes why flags cannot be shown."""
    columns = ["method" if c == "label" else c for c in by] + ["n"] + [header(m) for m in metrics]
    flag_col = flags and any(m in metrics for m in ("entropy_nats", "rep_n"))
    if flag_col:
        columns.append("collapse")
    if flags and not flag_col:
        notes.append("collapse flags need entropy_nats or rep_n; neither was recorded")
    if flag_col and not has_data:
        notes.append("no data reference row: collapse flags cannot be computed (n/a)")
    return columns, flag_col


def _row_flags(runs: pd.DataFrame, by: list, keys: list, data_rows: list) -> dict[int, dict]:
    """{row: collapse_flags} of each setting row against the data row, from entropy_nats and rep_n whether or not
    the table shows them: a flagged (collapsed or noisy) row is never marked best. {} without a data row."""
    from fsdfm.metrics import collapse_flags  # heavy: fsdfm.metrics imports torch (the report is torch-free else)

    if not data_rows:
        return {}
    means: dict = {}
    for _, r in summarize(runs, by, present(runs, ("entropy_nats", "rep_n"))).iterrows():
        means.setdefault(_key(r[c] for c in by), {})[r["metric"]] = r["mean"]
    data = means.get(keys[data_rows[0]], {})
    return {i: collapse_flags(means.get(k, {}), data) for i, k in enumerate(keys) if i not in data_rows}


def _setting_rows(keys, settings, by, metrics, stats, data_rows, row_flags, flag_col) -> tuple[list, list]:
    """(the shown cells, the numbers) of each setting's row: n, "mean ± std" per metric, the collapse flags."""
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
        fl = row_flags.get(i, {})
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
    return cells, numbers


def _mark(
    runs, samples, setting_of, keys, metrics, stats, data_rows, data_means, unreliable, cells, bold, offset
) -> dict:
    """Mark each metric's column in place: bold the significantly best row, TIE the rows tied with it, footnote
    unreliable MAUVE. Returns {"seeds": [metrics tested across seeds], "samples": [... across per-sample values],
    "untestable": [metrics no test could mark]}."""
    per_setting_samples: dict = {}
    if samples is not None and len(samples) and "run_id" in runs and "run_id" in samples:
        run_key = dict(zip(runs["run_id"], setting_of))
        keyed = samples.assign(_setting=samples["run_id"].map(run_key)).dropna(subset=["_setting"])
        per_setting_samples = {k: g for k, g in keyed.groupby("_setting", sort=False)}
    out: dict[str, list[str]] = {"seeds": [], "samples": [], "untestable": []}
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
            cands.append(
                significance.Candidate(i, seeds, significance.per_sample_values(per_setting_samples.get(key), m))
            )
        marks = significance.mark_best(m, cands, data_means.get(m), shown=lambda v, d=div, u=unit: fmt_number(v / d, u))
        for i in marks.best:
            bold[i][offset + j] = True
        for i in marks.tied:
            cells[i][offset + j] += f" {TIE}"
        if marks.test:
            out[marks.test].append(m)
        if marks.untestable:
            out["untestable"].append(m)
    return out


def _add_published(pub, by, metrics, flag_col, cells, bold, numbers, notes, n_columns: int) -> None:
    """Append the published rows (values as published, never marked) and a note naming each source."""
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
            bold.append([False] * n_columns)
            numbers.append(num)


def _marks_note(stats: dict, marked: dict, metrics: list, unreliable: dict, mauve_min_n: int) -> list[str]:
    """The notes that say what a cell holds and how the best marks were tested."""
    head = (
        "cells: mean ± std over seeds (runs sharing method, rule and steps); n = seeds"
        if any(int(s["n"]) > 1 for s in stats.values())
        else "cells: one seed per setting (no spread)"
    )
    out = [
        f"{head}; bold: best in its column, only where its difference from the runner-up is significant "
        f"(Welch t-test, p < {significance.ALPHA:g}; data, published, sanity and flagged rows excluded); "
        f"{TIE}: tied with the best (difference not significant)"
    ]
    if marked["seeds"]:
        out.append(f"tested across seeds: {', '.join(marked['seeds'])}")
    if marked["samples"]:
        out.append(
            "tested across per-sample values (fewer than 2 seeds): "
            + ", ".join(f"{m} ({significance.PER_SAMPLE_VALUES[m][2]})" for m in marked["samples"])
        )
    if marked["untestable"]:
        out.append(
            f"not marked, no test possible (one seed and no per-sample values): {', '.join(marked['untestable'])}"
        )
    target = [m for m in metrics if significance.is_data_target(m)]
    if target:
        out.append(f"ranked by distance to the data row (→ data), not by direction: {', '.join(target)}")
    if unreliable:
        out.append(
            f"{UNRELIABLE} MAUVE unreliable, n = {', '.join(map(str, sorted(set(unreliable.values()))))} samples per side "
            f"(< {mauve_min_n}): shown, never marked best"
        )
    return out
