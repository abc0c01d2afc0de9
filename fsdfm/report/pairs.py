"""The headline pairs table (`report.pairs` of a study's spec): each pair's difference per metric with a paired-t
or Welch interval (`fsdfm.report.significance.compare`). Which metrics it compares is the registry's view
"pairs"."""

from __future__ import annotations

import math

import pandas as pd

from fsdfm.metrics.registry import shown
import fsdfm.report.significance as significance
from fsdfm.report.summary import Study
from fsdfm.report.table import DASH, Table
from fsdfm.study.spec import PAIR_PATTERN

__all__ = ["pair_metrics", "pairs_table", "resolve_side"]


def pair_metrics() -> tuple[str, ...]:
    """The paired comparison's metrics (registry view "pairs")."""
    return shown("pairs")


def _fmt(x: float) -> str:
    return DASH if x is None or not math.isfinite(x) else f"{x:.4g}"


def resolve_side(study: Study, side: str) -> tuple[pd.DataFrame | None, str | None]:
    """The runs of one setting named "METHOD@STEPS" or "METHOD/RULE@STEPS", or (None, why not)."""

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


def _by_seed(r: pd.DataFrame, metric: str, seed_cols: list[str]) -> dict:
    """{(every seed column's value, as text): the run's `metric`}. Keyed by the seeds themselves: a run of A pairs
    with the run of B that shares all its seeds (training and sampling), never with whichever run happens to come
    at the same position."""
    vals = pd.to_numeric(r[metric], errors="coerce")
    return {
        tuple(row): v
        for row, v in zip(r[seed_cols].astype(str).itertuples(index=False), vals)
        if v == v  # NaN (a seed that did not record it) drops out rather than poisoning the pair
    }


def _with_holm(cells: list, numbers: list, notes: list) -> list:
    """Holm over the family of every test the table makes (each pair x metric), so "p (Holm) < 0.05" holds for
    the table as a whole, not for one cell chosen after the fact: the cells with their "p (Holm)" filled in;
    `numbers` gain p_holm and `notes` the family's size (both in place)."""
    adjusted = significance.holm([n["p"] for n in numbers])
    for n, q in zip(numbers, adjusted):
        n["p_holm"] = q
    if numbers:
        notes.append(
            f"p (Holm): Holm's step-down adjustment over this table's family of {len(numbers)} tests (every pair × "
            "metric), controlling the family-wise error rate at 0.05; p: each test alone"
        )
    return [(*c[:9], f"{q:.3g}", *c[10:]) for c, q in zip(cells, adjusted)]


def pairs_table(study: Study) -> Table:
    """The headline pairs of the spec (report.pairs): A - B per metric with a 95% CI of the difference and p
    (`fsdfm.report.significance.compare`: paired t across matched seeds, else Welch across per-sample values)."""
    cols = ("A", "B", "metric", "values", "mean A", "mean B", "A − B", "95% CI", "p", "p (Holm)", "test", "n")
    cells, numbers, notes = [], [], []
    seed_cols = [k for k in study.seed_keys if k in study.runs]
    for a_name, b_name in study.report_settings["pairs"]:
        (ra, why_a), (rb, why_b) = resolve_side(study, a_name), resolve_side(study, b_name)
        if ra is None or rb is None:
            if study.ablation_keys and "settings" in (why_a or why_b):  # a grid: one setting per cell
                notes.append(f"pair {a_name} vs {b_name} spans the grid: compared cell by cell in table_pair_grid")
            else:
                notes.append(f"pair {a_name} vs {b_name} not compared: {why_a or why_b}")
            continue
        # the per-sample tables of each side's runs: Welch's fallback when fewer than 2 seeds are shared
        sa = sb = None
        if study.samples is not None and len(study.samples) and "run_id" in study.samples:
            sa = study.samples[study.samples["run_id"].isin(ra["run_id"])]
            sb = study.samples[study.samples["run_id"].isin(rb["run_id"])]
        for m in pair_metrics():
            if m not in ra or m not in rb:
                continue

            c = significance.compare(m, _by_seed(ra, m, seed_cols), _by_seed(rb, m, seed_cols), sa, sb)
            if c is None:
                continue
            cells.append(
                (
                    a_name,
                    b_name,
                    m,
                    c.of,
                    _fmt(c.mean_a),
                    _fmt(c.mean_b),
                    _fmt(c.diff),
                    f"[{_fmt(c.ci[0])}, {_fmt(c.ci[1])}]",
                    f"{c.p:.3g}",
                    "",  # filled below, once the family is complete
                    c.test,
                    c.n,
                )
            )
            numbers.append(
                {
                    "a": a_name,
                    "b": b_name,
                    "metric": m,
                    "values": c.of,
                    "mean_a": c.mean_a,
                    "mean_b": c.mean_b,
                    "diff": c.diff,
                    "ci_low": c.ci[0],
                    "ci_high": c.ci[1],
                    "p": c.p,
                    "test": c.test,
                    "n": c.n,
                }
            )
    cells = _with_holm(cells, numbers, notes)
    notes.insert(
        0,
        "A − B with a 95% confidence interval: paired t across matched seeds where both settings have "
        ">= 2 shared seeds, else Welch's interval across per-sample values (samples of two models are "
        "independent draws, so they are not paired by index); gen_ppl is compared as per-sample NLL per "
        "scored token (log-perplexity units), MAUVE only across seeds",
    )
    return Table(
        name="table_pairs",
        title=f"{study.name}: headline pairs (report.pairs)",
        columns=cols,
        cells=tuple(cells),
        bold=tuple((False,) * len(cols) for _ in cells),
        sections=(),
        notes=tuple(notes),
        numbers=pd.DataFrame(numbers),
        n_label_columns=4,
    )
