"""The headline pair across a grid (the scaling question): for each `report.pairs` entry A vs B of a study whose
grid varies settings (its ablation keys: model size, training length, sequence length, ...), A − B in every grid
cell, and the trend of that difference along each numeric grid axis.

Per cell, A's runs meet the B runs that share the cell's values (a run that does not depend on a key, None in
its column, meets every value) and pair by seed: paired t over the shared seeds (`significance.compare`),
Holm over the table's family (every cell × metric).

The trend: the per-seed differences d of all cells fitted by ordinary least squares,

    d = b_0 + sum_k b_k log2(x_k) + e,

one regressor per numeric axis with >= 2 positive values, so b_k is the change of A − B per doubling of axis k
with the others held fixed. Its interval uses the heteroscedasticity-robust HC3 covariance (cells differ in
spread) and Student t on n - p degrees of freedom; Holm over every slope the table reports. A linear fit on
log2 axes is a description of the grid, not a law: the table also gives the fitted A − B at the grid's two
corners, and the per-cell table beside it is the evidence.

Knows the run table of `fsdfm.report.summary.Study` only: no records, no stages.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

import fsdfm.report.significance as significance
from fsdfm.metrics.registry import METRICS
from fsdfm.report.pairs import _by_seed, _fmt, pair_metrics
from fsdfm.report.summary import Study, grid_value
from fsdfm.report.table import Table
from fsdfm.study.spec import PAIR_PATTERN
from fsdfm.report.pairs import _with_holm

__all__ = ["Trend", "cell_differences", "fit_trend", "pair_grid_table", "pair_trend_table"]


@dataclass(frozen=True)
class Trend:
    """An OLS fit of d on [1, log2 x_1, ..., log2 x_k]: per-axis slope (per doubling), its 95% CI and p."""

    axes: tuple[str, ...]
    slopes: tuple[float, ...]
    ci: tuple[tuple[float, float], ...]
    p: tuple[float, ...]
    intercept: float
    n: int

    def at(self, point: dict) -> float:
        """The fitted d at `point` ({axis: value})."""
        return self.intercept + sum(b * math.log2(point[a]) for a, b in zip(self.axes, self.slopes))


def fit_trend(frame: pd.DataFrame, axes: list[str], y: str = "d", level: float = 0.95) -> Trend | None:
    """OLS of `frame[y]` on log2 of each of `axes` with HC3 standard errors; None with too few points (n <= p + 1).

    Args:
        frame: one row per observation (a seed's difference in a cell), holding `y` and each axis (> 0).
        axes: the regressors' columns.
    Returns:
        a `Trend`; its slopes are per doubling of each axis.
    """
    n, p = len(frame), len(axes) + 1
    if n <= p + 1:
        return None
    x = np.column_stack([np.ones(n)] + [np.log2(frame[a].astype(float).to_numpy()) for a in axes])
    yv = frame[y].astype(float).to_numpy()
    xtx_inv = np.linalg.pinv(x.T @ x)
    beta = xtx_inv @ x.T @ yv
    resid = yv - x @ beta
    lev = np.einsum("ij,jk,ik->i", x, xtx_inv, x)  # hat-matrix diagonal
    # HC3: each squared residual inflated by 1/(1 - h_ii)^2, robust to cells of unequal spread and to leverage
    w = resid**2 / np.clip(1.0 - lev, 1e-12, None) ** 2
    cov = xtx_inv @ (x.T * w) @ x @ xtx_inv
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    df = n - p
    t_crit = float(stats.t.ppf(0.5 + level / 2, df))
    slopes, cis, ps = [], [], []
    for j in range(1, p):
        b, s = float(beta[j]), float(se[j])
        slopes.append(b)
        cis.append((b - t_crit * s, b + t_crit * s))
        ps.append(float(2 * stats.t.sf(abs(b / s), df)) if s > 0 else (0.0 if b != 0 else 1.0))
    return Trend(tuple(axes), tuple(slopes), tuple(cis), tuple(ps), float(beta[0]), n)


def _side(study: Study, side: str) -> pd.DataFrame:
    g = PAIR_PATTERN.match(side).groupdict()
    runs = study.models
    sel = runs[(runs["method"] == g["method"]) & (pd.to_numeric(runs["steps"], errors="coerce") == int(g["steps"]))]
    return sel[sel["rule"] == g["rule"]] if g["rule"] is not None else sel


def _cells(runs: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.DataFrame]:
    """{cell values (None where the runs do not depend on a key): the runs of that cell}."""
    if runs.empty:
        return {}
    vals = runs[keys].astype(object).where(runs[keys].notna(), None)
    return {cell: runs.loc[idx] for cell, idx in vals.groupby(keys, dropna=False, sort=True).groups.items()}


def _meets(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def cell_differences(study: Study, a_name: str, b_name: str, metric: str) -> pd.DataFrame:
    """One row per (cell, shared seed): the cell's key values, `seed` and d = A − B on `metric`."""
    keys = list(study.ablation_keys)
    seed_cols = [k for k in study.seed_keys if k in study.runs]
    a_cells, b_cells = _cells(_side(study, a_name), keys), _cells(_side(study, b_name), keys)
    rows = []
    for ca, ra in a_cells.items():
        cell = tuple(ca) if isinstance(ca, tuple) else (ca,)
        for cb, rb in b_cells.items():
            if metric not in ra or metric not in rb or not _meets(cell, tuple(cb) if isinstance(cb, tuple) else (cb,)):
                continue
            sa, sb = _by_seed(ra, metric, seed_cols), _by_seed(rb, metric, seed_cols)
            for seed in (s for s in sa if s in sb):
                rows.append({**dict(zip(keys, cell)), "seed": "/".join(seed), "d": sa[seed] - sb[seed]})
    return pd.DataFrame(rows, columns=[*keys, "seed", "d"])


def _cell_label(keys: list[str], cell: tuple) -> str:
    return ", ".join(
        f"{k.split('.')[-1] if k.count('.') < 2 else '.'.join(k.split('.')[-2:])}={grid_value(v)}"
        for k, v in zip(keys, cell)
    )


def pair_grid_table(study: Study) -> Table:
    """A − B per grid cell and metric for each `report.pairs` entry, paired over seeds, Holm over the table."""

    keys = list(study.ablation_keys)
    cols = ("A", "B", "metric", "cell", "values", "mean A", "mean B", "A − B", "95% CI", "p", "p (Holm)", "test", "n")
    cells, numbers, notes = [], [], []
    seed_cols = [k for k in study.seed_keys if k in study.runs]
    for a_name, b_name in study.report_settings["pairs"] if keys else ():
        a_cells, b_cells = _cells(_side(study, a_name), keys), _cells(_side(study, b_name), keys)
        for m in pair_metrics():
            for ca, ra in a_cells.items():
                ca = tuple(ca) if isinstance(ca, tuple) else (ca,)
                rb = [r for cb, r in b_cells.items() if _meets(ca, tuple(cb) if isinstance(cb, tuple) else (cb,))]
                if m not in ra or not rb or m not in rb[0]:
                    continue
                rb = pd.concat(rb)
                c = significance.compare(m, _by_seed(ra, m, seed_cols), _by_seed(rb, m, seed_cols), None, None)
                if c is None:
                    continue
                label = _cell_label(keys, ca)
                ci = f"[{_fmt(c.ci[0])}, {_fmt(c.ci[1])}]"
                cells.append((a_name, b_name, m, label, c.of, _fmt(c.mean_a), _fmt(c.mean_b), _fmt(c.diff), ci))
                cells[-1] += (f"{c.p:.3g}", "", c.test, c.n)
                numbers.append(
                    {"a": a_name, "b": b_name, "metric": m, **dict(zip(keys, ca)), "values": c.of, "mean_a": c.mean_a}
                    | {"mean_b": c.mean_b, "diff": c.diff, "ci_low": c.ci[0], "ci_high": c.ci[1], "p": c.p, "n": c.n}
                )
    # _with_holm fills column 9 ("p (Holm)" in the pairs table); here it is column 10: shift the cells around it
    shifted = _with_holm([c[:3] + c[4:] for c in cells], numbers, notes)
    cells = [s[:3] + (c[3],) + s[3:] for s, c in zip(shifted, cells)]
    notes.insert(
        0, "A − B in each grid cell: paired t across the cell's shared seeds (each seed its own teacher and student)"
    )
    return Table(
        name="table_pair_grid",
        title=f"{study.name}: headline pairs in each grid cell (report.pairs)",
        columns=cols,
        cells=tuple(cells),
        bold=tuple((False,) * len(cols) for _ in cells),
        sections=(),
        notes=tuple(notes),
        numbers=pd.DataFrame(numbers),
        n_label_columns=5,
    )


def _numeric_axes(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """The keys whose values in `frame` are all numbers > 0, with >= 2 distinct ones (log2 needs > 0)."""
    out = []
    for k in keys:
        v = pd.to_numeric(frame[k], errors="coerce")
        if v.notna().all() and (v > 0).all() and v.nunique() >= 2:
            out.append(k)
    return out


def pair_trend_table(study: Study) -> Table:
    """For each `report.pairs` entry and metric, the OLS slope of A − B per doubling of each numeric grid axis
    (`fit_trend`), with the fitted A − B at the grid's smallest and largest corners; Holm over every slope."""
    keys = list(study.ablation_keys)
    cols = (
        "A",
        "B",
        "metric",
        "axis",
        "slope per doubling",
        "95% CI",
        "p",
        "p (Holm)",
        "n",
        "fit at min",
        "fit at max",
    )
    rows, numbers, notes = [], [], []
    for a_name, b_name in study.report_settings["pairs"] if keys else ():
        for m in pair_metrics():
            frame = cell_differences(study, a_name, b_name, m)
            axes = _numeric_axes(frame, keys) if len(frame) else []
            trend = fit_trend(frame.assign(**{a: pd.to_numeric(frame[a]) for a in axes}), axes) if axes else None
            if trend is None:
                if len(frame):
                    notes.append(f"{a_name} − {b_name}, {m}: too few cells or numeric axes to fit a trend")
                continue
            lo = {a: float(pd.to_numeric(frame[a]).min()) for a in axes}
            hi = {a: float(pd.to_numeric(frame[a]).max()) for a in axes}
            for a, b, ci, p in zip(trend.axes, trend.slopes, trend.ci, trend.p):
                rows.append([a_name, b_name, m, a, _fmt(b), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]", f"{p:.3g}", ""])
                rows[-1] += [str(trend.n), _fmt(trend.at(lo)), _fmt(trend.at(hi))]
                numbers.append(
                    {"a": a_name, "b": b_name, "metric": m, "axis": a, "slope": b, "ci_low": ci[0], "ci_high": ci[1]}
                    | {"p": p, "n": trend.n, "fit_min": trend.at(lo), "fit_max": trend.at(hi)}
                )
    adjusted = significance.holm([n["p"] for n in numbers])
    for r, n, q in zip(rows, numbers, adjusted):
        r[7], n["p_holm"] = f"{q:.3g}", q
    if numbers:
        notes.append(
            f"slope: OLS of the per-seed A − B of every cell on log2 of each axis (the change per doubling, the other "
            f"axes held fixed); 95% CI from HC3 robust standard errors, Student t; p (Holm) over this table's "
            f"{len(numbers)} slopes. fit at min / max: the fitted A − B at the grid's smallest / largest corner. "
            "A linear fit on log2 axes describes this grid; it is not a law to extrapolate"
        )
    return Table(
        name="table_pair_trend",
        title=f"{study.name}: trend of the headline pairs across the grid",
        columns=cols,
        cells=tuple(tuple(r) for r in rows),
        bold=tuple((False,) * len(cols) for _ in rows),
        sections=(),
        notes=tuple(notes),
        numbers=pd.DataFrame(numbers),
        n_label_columns=4,
    )


def pair_grid_figure(study: Study):
    """A − B of the first `report.pairs` entry against the grid axis with the most values (log2 x), one line per
    value of the next axis, one panel per value of the rest; mean over seeds with its 95% t interval."""
    # heavy: matplotlib (the analysis extra); tables are written without it
    from fsdfm.report.plotting import Drawn, SkipFigure, _legend_outside, _new_figure, _palette, _style
    from fsdfm.report.plotting import ci95_half_width  # see above

    pairs, keys = study.report_settings["pairs"], list(study.ablation_keys)
    if not pairs or not keys:
        raise SkipFigure("no report.pairs across a grid of settings")
    a_name, b_name = pairs[0]
    frames = {m: cell_differences(study, a_name, b_name, m) for m in pair_metrics()}
    # a quality metric (one with a direction: oracle_nll, gen_ppl) before a data-targeted one (entropy), whatever
    # the registry's order
    ranked = sorted((m for m, f in frames.items() if len(f)), key=lambda m: METRICS.get(m).direction is None)
    metric = ranked[0] if ranked else None
    if metric is None:
        raise SkipFigure(f"{a_name} and {b_name} share no seed in any cell")
    frame = frames[metric]
    axes = sorted(_numeric_axes(frame, keys), key=lambda k: -frame[k].nunique())
    if not axes:
        raise SkipFigure("no numeric grid axis with two values")
    x_key, rest = axes[0], [k for k in keys if k != axes[0]]
    line_key, panel_keys = (rest[0], rest[1:]) if rest else (None, [])
    panels = list(frame.groupby(panel_keys, dropna=False).groups) if panel_keys else [None]
    lines = sorted(frame[line_key].dropna().unique()) if line_key else [None]
    colors = dict(zip(lines, _palette(len(lines))))
    with _style():
        fig, axs = _new_figure(len(panels))
        for ax, panel in zip(axs, panels):
            part = frame if panel is None else frame.loc[frame.groupby(panel_keys, dropna=False).groups[panel]]
            for line in lines:
                g = part if line is None else part[part[line_key] == line]
                st = g.groupby(x_key)["d"].agg(["mean", "std", "count"]).reset_index().sort_values(x_key)
                half = [ci95_half_width(s, int(n)) if n > 1 else 0.0 for s, n in zip(st["std"], st["count"])]
                lab = f"{line_key.split('.')[-1]}={grid_value(line)}" if line_key else metric
                ax.errorbar(
                    st[x_key].astype(float), st["mean"], yerr=half, marker="o", capsize=3, color=colors[line], label=lab
                )
            ax.axhline(0.0, color="black", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"{x_key} (log2 scale)")
            ax.set_ylabel(f"{metric}: {a_name} − {b_name}")
            if panel is not None:
                vals = panel if isinstance(panel, tuple) else (panel,)
                ax.set_title(", ".join(f"{k.split('.')[-1]}={grid_value(v)}" for k, v in zip(panel_keys, vals)))
        # wrapped: the names of a long pair overran the figure's width (the title was clipped)
        fig.suptitle(textwrap.fill(f"{study.name}: {a_name} − {b_name} across the grid (mean over seeds, 95% CI)", 70))
        _legend_outside(fig, axs)
    caption = (
        f"{metric} of {a_name} minus {b_name} in each grid cell, paired by seed, against {x_key} (log2 axis); "
        "error bars: 95% t interval of the mean over seeds; dashed: no difference. The fitted slopes are "
        "table_pair_trend."
    )
    return [Drawn("fig_pair_grid", "Headline pair across the grid", caption, fig)]
