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
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from fsdfm.report import significance
from fsdfm.report.published import published_tables
from fsdfm.report.summary import (
    DATA_KIND, DEFAULT_BY, POS_KIND, SAMPLING_WALL_S, Study, metric_info, present, summarize,
)

# The quality table: perplexity, entropy, MAUVE, diversity (in this order; absent metrics are skipped).
MAIN_METRICS = ("gen_ppl", "gen_ppl_seq_mean", "entropy_nats", "mauve", "distinct_2", "distinct_4", "self_bleu",
                "rep_n", "oracle_nll", "ngram_tv", "ngram_tv_floor", "oracle_expected_nll", "oracle_entropy_rate")
COST_METRICS = ("nfe", SAMPLING_WALL_S, "tokens_per_s", "peak_mem")
POS_METRICS = ("pos_divergence", "pos_agreement", "pos_divergence_slope")
SEED_METRICS = ("gen_ppl", "entropy_nats", "mauve", "rep_n")
DASH = "—"
# display scaling by unit: (divisor, unit shown in the header)
_SCALE = {"bytes": (2.0 ** 20, "MiB")}
_ARROW = {"min": "↓", "max": "↑", None: ""}
TIE = "≈"
UNRELIABLE = "†"
MAUVE_MIN_N = 256


# ------------------------------------------------------------------------------------------- formatting
def decimals(unit: str, value: float) -> int:
    """Digits after the point for a value of `unit` (enough to tell seeds apart, no more)."""
    if unit in ("evals", "tok/s", "MiB"):
        return 0
    if unit == "ppl":
        return 1 if abs(value) >= 100 else 2
    if unit in ("BLEU", "s"):
        return 2 if abs(value) >= 1 else 3
    return 3


def fmt_number(x: float, unit: str, ref: float | None = None) -> str:
    """`x` at the precision `decimals(unit, ref or x)`; "—" for NaN/None."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x):
        return DASH
    return f"{x:.{decimals(unit, x if ref is None else ref)}f}"


def fmt_mean_std(mean: float, std: float, n: int, unit: str) -> str:
    """ "mean ± std" (std over seeds, ddof 1); just "mean" for a single seed."""
    if pd.isna(mean):
        return DASH
    if n < 2 or pd.isna(std):
        return fmt_number(mean, unit)
    return f"{fmt_number(mean, unit)} ± {fmt_number(std, unit, ref=mean)}"


def display_unit(metric: str) -> tuple[float, str]:
    """(divisor, unit) a metric is shown in: bytes as MiB, everything else as recorded."""
    unit = metric_info(metric).unit
    return _SCALE.get(unit, (1.0, unit))


def header(metric: str) -> str:
    """Column header: name, displayed unit where it is not obvious, direction arrow ("→ data" for metrics whose
    target is the data row's value)."""
    shown = display_unit(metric)[1]
    unit = f" ({shown})" if shown in ("MiB", "s", "tok/s", "nats/token") else ""
    arrow = "→ data" if significance.is_data_target(metric) else _ARROW[metric_info(metric).direction]
    return f"{metric}{unit} {arrow}".rstrip()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "—": "---", "–": "--",
                  "≈": r"$\approx$", "†": r"$^\dagger$", "→": r"$\rightarrow$"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(s))


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Table:
    """A rendered table: `columns` headers, `cells` rows of strings, `bold` mask of the same shape, `sections`
    (row indices that open a new block: a rule is drawn above them), `notes` (printed under the table) and
    `numbers` (the raw values, written as CSV)."""

    name: str
    title: str
    columns: tuple
    cells: tuple
    bold: tuple
    sections: tuple
    notes: tuple
    numbers: pd.DataFrame
    n_label_columns: int = 3

    @property
    def empty(self) -> bool:
        return not self.cells

    def frame(self, markup: str = "") -> pd.DataFrame:
        """The cells as a DataFrame; markup "markdown" wraps bold cells in ** **."""
        rows = [[f"**{c}**" if (b and markup == "markdown") else c for c, b in zip(r, br)]
                for r, br in zip(self.cells, self.bold)]
        return pd.DataFrame(rows, columns=list(self.columns))

    def to_markdown(self, notes: bool = True) -> str:
        if self.empty:
            return f"_{self.title}: no rows._\n"
        align = ["left"] * self.n_label_columns + ["right"] * (len(self.columns) - self.n_label_columns)
        text = self.frame("markdown").to_markdown(index=False, disable_numparse=True, colalign=align)
        if notes and self.notes:
            text += "\n\n" + "\n".join(f"* {n}" for n in self.notes)
        return text + "\n"

    def to_latex(self) -> str:
        """A booktabs tabular (needs \\usepackage{booktabs}); notes as a comment block above it."""
        k = len(self.columns)
        spec = "l" * self.n_label_columns + "r" * (k - self.n_label_columns)
        lines = [f"% {latex_escape(self.title)}"] + [f"% {n}" for n in self.notes]
        lines += [f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
                  " & ".join(latex_escape(c) for c in self.columns) + r" \\", r"\midrule"]
        for i, (row, brow) in enumerate(zip(self.cells, self.bold)):
            if i in self.sections and i > 0:
                lines.append(r"\midrule")
            cells = [f"\\textbf{{{latex_escape(c)}}}" if b else latex_escape(c) for c, b in zip(row, brow)]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        self.numbers.to_csv(buf, index=False)
        return buf.getvalue()


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
    samples: per-sample table (`fsdfm.results.load_samples`) joined to `runs` by run_id: the values a best mark
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


def main_table(study: Study, published: Sequence[str] = (), metrics: Sequence[str] = MAIN_METRICS) -> Table:
    """Quality by method and step budget: perplexity, entropy, MAUVE, diversity; data row first; collapse."""
    runs = study.runs[study.runs["kind"] != POS_KIND] if "kind" in study.runs else study.runs
    return metric_table(runs, metrics, name="table_main", title=f"{study.name}: sample quality by method and step budget",
                        published=published, extra_notes=_n_samples_note(runs), samples=study.samples,
                        mauve_min_n=study.report_settings["mauve_min_n"])


def cost_table(study: Study) -> Table:
    """Sampling cost by method and step budget (no data row): NFE, sampling wall-clock, throughput, memory."""
    return metric_table(study.models, COST_METRICS, name="table_cost", flags=False,
                        title=f"{study.name}: sampling cost (evaluator time excluded)")


def pos_divergence_table(study: Study) -> Table:
    """Per-position divergence summaries (mean TV, agreement, TV slope) per student and step budget."""
    return metric_table(study.divergence, POS_METRICS, name="table_pos_divergence", flags=False,
                        title=f"{study.name}: few-step student vs many-step teacher, per-position divergence")


def seeds_table(study: Study, metrics: Sequence[str] = SEED_METRICS) -> Table:
    """Run-to-run variance: per setting and metric, n seeds, mean, std, 95% CI, min, max, std/mean."""
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
        out.append(metric_table(runs, MAIN_METRICS + ("nfe",), name=f"table_ablation_{kind}",
                                title=f"{study.name}: ablation of {kind} ({len(labels)} variants)",
                                samples=study.samples, mauve_min_n=study.report_settings["mauve_min_n"]))
    return out


# ---------------------------------------------------------------------------------- paired comparisons
PAIR_METRICS = ("gen_ppl", "gen_ppl_seq_mean", "entropy_nats", "rep_n", "oracle_nll", "mauve")


def _fmt(x: float) -> str:
    return DASH if x is None or not math.isfinite(x) else f"{x:.4g}"


def resolve_side(study: Study, side: str) -> tuple[pd.DataFrame | None, str | None]:
    """The runs of one setting named "METHOD@STEPS" or "METHOD/RULE@STEPS", or (None, why not)."""
    from fsdfm.study.spec import PAIR_PATTERN

    match = PAIR_PATTERN.match(side)
    if match is None:
        return None, f"{side!r} is not METHOD@STEPS or METHOD/RULE@STEPS"
    g = match.groupdict()
    runs = study.models
    if "method" not in runs:
        return None, f"{side!r}: the run table has no method column"
    sel = runs[(runs["method"] == g["method"]) & (pd.to_numeric(runs["steps"], errors="coerce") == int(g["steps"]))]
    if g["rule"] is not None:
        sel = sel[sel["rule"] == g["rule"]]
    if sel.empty:
        return None, f"{side!r}: no finished run"
    labels = sel[["label", "rule"]].drop_duplicates()
    if len(labels) > 1:
        opts = ", ".join(f"{r.label} / {r.rule}" for r in labels.itertuples())
        return None, f"{side!r} names {len(labels)} settings ({opts}): write METHOD/RULE@STEPS"
    return sel, None


def pairs_table(study: Study) -> Table:
    """The headline pairs of the spec (report.pairs): A - B per metric with a 95% CI of the difference and p
    (`fsdfm.report.significance.compare`: paired t across matched seeds, else Welch across per-sample values)."""
    cols = ("A", "B", "metric", "values", "mean A", "mean B", "A − B", "95% CI", "p", "test", "n")
    cells, numbers, notes = [], [], []
    seed_cols = [k for k in study.seed_keys if k in study.runs]
    for a_name, b_name in study.report_settings["pairs"]:
        (ra, why_a), (rb, why_b) = resolve_side(study, a_name), resolve_side(study, b_name)
        if ra is None or rb is None:
            notes.append(f"pair {a_name} vs {b_name} not compared: {why_a or why_b}")
            continue
        sa = sb = None
        if study.samples is not None and len(study.samples) and "run_id" in study.samples:
            sa = study.samples[study.samples["run_id"].isin(ra["run_id"])]
            sb = study.samples[study.samples["run_id"].isin(rb["run_id"])]
        for m in PAIR_METRICS:
            if m not in ra or m not in rb:
                continue

            def by_seed(r: pd.DataFrame) -> dict:
                vals = pd.to_numeric(r[m], errors="coerce")
                return {tuple(row): v for row, v in zip(r[seed_cols].astype(str).itertuples(index=False), vals) if v == v}

            c = significance.compare(m, by_seed(ra), by_seed(rb), sa, sb)
            if c is None:
                continue
            cells.append((a_name, b_name, m, c.of, _fmt(c.mean_a), _fmt(c.mean_b), _fmt(c.diff),
                          f"[{_fmt(c.ci[0])}, {_fmt(c.ci[1])}]", f"{c.p:.3g}", c.test, c.n))
            numbers.append({"a": a_name, "b": b_name, "metric": m, "values": c.of, "mean_a": c.mean_a,
                            "mean_b": c.mean_b, "diff": c.diff, "ci_low": c.ci[0], "ci_high": c.ci[1], "p": c.p,
                            "test": c.test, "n": c.n})
    notes.insert(0, "A − B with a 95% confidence interval: paired t across matched seeds where both settings have "
                    ">= 2 shared seeds, else Welch's interval across per-sample values (samples of two models are "
                    "independent draws, so they are not paired by index); gen_ppl is compared as per-sample NLL per "
                    "scored token (log-perplexity units), MAUVE only across seeds")
    return Table(name="table_pairs", title=f"{study.name}: headline pairs (report.pairs)", columns=cols,
                 cells=tuple(cells), bold=tuple((False,) * len(cols) for _ in cells), sections=(),
                 notes=tuple(notes), numbers=pd.DataFrame(numbers), n_label_columns=4)


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


__all__ = ["Table", "MAIN_METRICS", "COST_METRICS", "POS_METRICS", "SEED_METRICS", "metric_table", "main_table",
           "pairs_table", "sample_count_warnings", "resolve_side",
           "cost_table", "pos_divergence_table", "seeds_table", "ablation_tables", "ablation_kinds", "summary_csv",
           "best_rows", "display_unit", "fmt_mean_std", "fmt_number", "header", "latex_escape"]
