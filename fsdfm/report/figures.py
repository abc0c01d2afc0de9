"""Figures of a study (matplotlib, Agg canvas, seaborn palettes), each written as PNG and PDF.

Figure kinds, by registry name (`FIGURES`):

* `step_sweep`     metric vs step budget, log2 x axis, one line per (label, rule): mean over seeds with a
                   95% confidence band (Student t); the data reference as a dashed horizontal line.
* `frontier`       gen_ppl vs sampling wall-clock (log x), one line per (label, rule), points labelled by
                   their step budget; error bars: 95% confidence intervals over seeds.
* `pos_divergence` per-position TV distance and agreement to the many-step teacher, one line per
                   (student, step budget); seeds averaged, 95% confidence band.
* `ablation`       one figure per method kind with several variants: bars of each variant at one step
                   budget (the one most variants share), 95% CI error bars and the seeds as dots.
* `quality_vs_nfe` (`fsdfm.report.nfe_figure`) quality vs the number of model calls (NFE), 95% bands.

Every band and error bar is the 95% Student-t interval of the mean over seeds, mean ± t_{0.975, n-1} s / sqrt(n)
(`ci95_half_width`); a setting with one seed has none.

A builder returns the figures it drew, or raises `SkipFigure` saying why there is nothing to draw (the
report lists the reason); no empty figure is ever written. Figures are drawn on `Figure` objects with
an Agg canvas, never through pyplot's global state, so any interactive backend is left alone.

Shared plotting helpers and the figure types are `fsdfm.report.plotting`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fsdfm.metrics.registry import shown
from fsdfm.registry import Registry
from fsdfm.report.plotting import (
    _RULE_MARKERS,
    _RULE_STYLES,
    _plot_series,
    Drawn,
    FigureResult,
    SkipFigure,
    _data_mean,
    _legend_outside,
    _log2_steps,
    _n_text,
    _new_figure,
    _palette,
    _plain_log,
    _series_key,
    _setting_stats,
    _shade,
    _steps_text,
    _style,
    axis_label,
    ci95_half_width,
    save_figure,
)
from fsdfm.report.summary import DATA_LABEL, POS_KIND, SAMPLING_WALL_S, Study, metric_info, present
from fsdfm.records import read_record, stage_dir
from fsdfm.report.tables import ablation_kinds

FIGURES: Registry[Callable[[Study], "list[Drawn]"]] = Registry("figure")


# ------------------------------------------------------------------------------------------- step sweep
@FIGURES.register("step_sweep")
def step_sweep(study: Study, metrics: tuple | None = None) -> list[Drawn]:
    """Metric vs step budget (log2 x), mean and 95% CI over seeds per (label, rule), data as a dashed line."""
    runs = study.models
    runs = runs[runs["steps"].notna()] if "steps" in runs else runs.iloc[:0]
    if runs.empty:
        raise SkipFigure("no model runs with a step budget")
    wanted = shown("sweep") if metrics is None else metrics
    metrics = present(runs, wanted)
    if not metrics:
        raise SkipFigure(f"none of {', '.join(wanted)} was recorded")
    if runs["steps"].nunique() < 2:
        raise SkipFigure(f"only one step budget ({int(runs['steps'].iloc[0])}); nothing to sweep")
    series = list(dict.fromkeys(zip(runs["label"], runs["rule"].astype(object).where(runs["rule"].notna(), None))))
    labels = list(dict.fromkeys(runs["label"]))
    rules = list(dict.fromkeys(r for _, r in series))
    colors = dict(zip(labels, _palette(len(labels))))
    ns = []
    with _style():
        fig, axes = _new_figure(len(metrics))
        for ax, m in zip(axes, metrics):
            st = _setting_stats(runs, m)
            for label, rule in series:
                sel = st[(st["label"] == label) & ((st["rule"] == rule) if rule is not None else st["rule"].isna())]
                sel = sel.sort_values("steps")
                if sel.empty:
                    continue
                x = sel["steps"].astype(float).to_numpy()
                y = sel["mean"].to_numpy()
                sd = sel["ci95"].fillna(0).to_numpy()  # 95% CI half-width (0 for one seed: no band)
                ns += list(sel["n"])
                band = bool((sel["n"] > 1).any())
                _plot_series(ax, x, y, sd, band, colors[label], rules.index(rule), _series_key(label, rule))
            ref = _data_mean(study, m)
            if ref is not None:
                ax.axhline(ref, color="black", ls="--", lw=1.2, label=DATA_LABEL)
            _log2_steps(ax, runs["steps"])
            if metric_info(m).unit == "ppl":
                _plain_log(ax, "y")
            ax.set_xlabel("sampling steps (log2 scale)")
            ax.set_ylabel(axis_label(m))
            ax.set_title(m)
        band = "band: 95% CI of the mean over seeds" if any(n > 1 for n in ns) else "single seed per point"
        fig.suptitle(f"{study.name}: sample quality vs step budget (mean; {band})")
        _legend_outside(fig, axes)
    caption = (
        f"Each metric against the sampling step budget (log2 axis), one line per method · update rule; "
        f"{band} ({_n_text(ns)}); dashed black: data (held-out) reference."
    )
    return [Drawn("fig_step_sweep", "Quality vs step budget", caption, fig)]


# --------------------------------------------------------------------------------------------- frontier
@FIGURES.register("frontier")
def frontier(study: Study, metric: str = "gen_ppl") -> list[Drawn]:
    """`metric` (gen_ppl) vs sampling wall-clock (log x) per (label, rule), points labelled by steps."""
    runs = study.models
    if runs.empty:
        raise SkipFigure("no model runs")
    missing = [m for m in (metric, SAMPLING_WALL_S) if not present(runs, [m])]
    if missing:
        why = {metric: f"{metric} was not recorded", SAMPLING_WALL_S: "no sampling wall-clock was recorded"}
        raise SkipFigure("; ".join(why[m] for m in missing))
    y_st = _setting_stats(runs, metric)
    x_st = _setting_stats(runs, SAMPLING_WALL_S)
    both = y_st.merge(x_st, on=["label", "rule", "steps"], suffixes=("_y", "_x"))
    both = both[(both["mean_x"] > 0)]
    if both.empty:
        raise SkipFigure(f"no run has both {metric} and a positive sampling wall-clock")
    labels = list(dict.fromkeys(both["label"]))
    colors = dict(zip(labels, _palette(len(labels))))
    rules = list(dict.fromkeys(both["rule"].astype(object).where(both["rule"].notna(), None)))
    with _style():
        fig, (ax,) = _new_figure(1, w=7.0, h=5.0)
        for (label, rule), g in both.groupby(["label", "rule"], dropna=False, sort=False):
            rule = None if pd.isna(rule) else rule
            g = g.sort_values("steps")
            k = rules.index(rule)
            ax.errorbar(
                g["mean_x"],
                g["mean_y"],
                xerr=g["ci95_x"].fillna(0),
                yerr=g["ci95_y"].fillna(0),
                color=colors[label],
                ls=_RULE_STYLES[k % 4],
                marker=_RULE_MARKERS[k % 4],
                ms=5,
                capsize=2,
                label=_series_key(label, rule),
            )
            for _, r in g.iterrows():
                ax.annotate(
                    f"{int(r['steps'])}",
                    (r["mean_x"], r["mean_y"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colors[label],
                )
        ref = _data_mean(study, metric)
        if ref is not None:
            ax.axhline(ref, color="black", ls="--", lw=1.2, label=DATA_LABEL)
        _plain_log(ax, "x")
        if metric_info(metric).unit == "ppl":
            _plain_log(ax, "y")
        source = study.wall_s_source
        xlab = "sampling wall-clock per run (s, log scale)"
        if source == "wall_s" and "stage_wall_s" not in study.runs:
            xlab = "stage wall-clock per run (s, log scale; sampler time not recorded separately)"
        ax.set_xlabel(xlab)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{study.name}: quality vs sampling cost (point labels: steps)")
        _legend_outside(fig, [ax], where="bottom")
    n = _n_text(list(both["n_x"]) + list(both["n_y"]))
    caption = (
        f"{metric} against sampling wall-clock (log x; evaluator time excluded), one line per method · rule, "
        f"points labelled by step budget; error bars: 95% CI of the mean ({n}); lower-left is better."
    )
    return [Drawn("fig_frontier", "Quality vs wall-clock frontier", caption, fig)]


# ---------------------------------------------------------------------------------------- pos divergence
def divergence_curves(study: Study) -> pd.DataFrame:
    """Per-position curves of the study's pos_divergence runs, long format: label, steps, run_id, position,
    tv, js, agreement (read from each run's final record payload "curves")."""

    rows = []
    for _, run in study.divergence.iterrows():
        rec = read_record(stage_dir(study.path, run["stage_id"]), warn=True) or {}
        curves = (rec.get("payload") or {}).get("curves") or {}
        tv = curves.get("tv")
        if not tv:
            continue
        for name in ("tv", "js", "agreement"):
            c = curves.get(name)
            if c is not None and len(c) != len(tv):
                raise ValueError(
                    f"{stage_dir(study.path, run['stage_id'])}/record.json: curves.{name} has {len(c)} "
                    f"positions, curves.tv has {len(tv)}"
                )
        for pos in range(len(tv)):
            rows.append(
                {
                    "label": run["label"],
                    "steps": run["steps"],
                    "run_id": run["run_id"],
                    "position": pos,
                    **{k: (curves[k][pos] if curves.get(k) is not None else np.nan) for k in ("tv", "js", "agreement")},
                }
            )
    return pd.DataFrame(rows, columns=["label", "steps", "run_id", "position", "tv", "js", "agreement"])


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1:
        return y
    k = np.ones(w) / w
    pad = np.pad(y, (w // 2, w - 1 - w // 2), mode="edge")
    return np.convolve(pad, k, mode="valid")


@FIGURES.register("pos_divergence")
def pos_divergence(study: Study) -> list[Drawn]:
    """TV distance and agreement to the many-step teacher vs position, per (student, step budget)."""
    if study.divergence.empty:
        planned = sum((r.get("params") or {}).get("kind") == POS_KIND for r in study.plan.get("runs", []))
        if planned:  # planned but not (yet) finished: a partial or failed study, not a spec without the metric
            raise SkipFigure(f"none of the study's {planned} pos_divergence runs has finished")
        raise SkipFigure("the study has no pos_divergence runs (metrics.pos_divergence not set in the spec)")
    curves = divergence_curves(study)
    if curves.empty:
        raise SkipFigure("the pos_divergence records hold no per-position curves")
    length = int(curves["position"].max()) + 1
    w = max(1, length // 32) if length >= 64 else 1
    keys = list(dict.fromkeys(zip(curves["label"], curves["steps"])))
    students = list(dict.fromkeys(curves["label"]))
    budgets = sorted({int(s) for s in curves["steps"]})
    # hue: student; shade: step budget (lighter = fewer steps), so every curve stays a solid, visible line
    colors = {}
    for student, base in zip(students, _palette(len(students))):
        for k, b in enumerate(budgets):
            colors[(student, b)] = _shade(base, k, len(budgets))
    panels = [
        ("tv", "total variation distance (0-1)\n(lower is better)"),
        ("agreement", "token agreement (fraction)\n(higher is better)"),
    ]
    ns = []
    with _style():
        fig, axes = _new_figure(2, ncols=2, w=5.2, h=3.6)
        for ax, (col, ylab) in zip(axes, panels):
            for key in keys:
                g = curves[(curves["label"] == key[0]) & (curves["steps"] == key[1])]
                mat = g.pivot(index="run_id", columns="position", values=col).to_numpy(dtype=float)
                mean = np.nanmean(mat, axis=0)
                ns.append(mat.shape[0])
                x = np.arange(len(mean))
                name = f"{key[0]}, {_steps_text(key[1])}"
                color, ls = colors[(key[0], int(key[1]))], "-"
                if w > 1:
                    ax.plot(x, mean, color=color, ls=ls, lw=0.6, alpha=0.35)
                ax.plot(x, _smooth(mean, w), color=color, ls=ls, lw=1.8, label=name)
                if mat.shape[0] > 1:
                    sd = _smooth(ci95_half_width(np.nanstd(mat, axis=0, ddof=1), mat.shape[0]), w)
                    sm = _smooth(mean, w)
                    ax.fill_between(x, sm - sd, sm + sd, color=color, alpha=0.15, lw=0)
            ax.set_xlabel("position in sequence (token index)")
            ax.set_ylabel(ylab)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlim(0, length - 1)
        axes[0].set_title("TV distance to teacher")
        axes[1].set_title("agreement with teacher")
        smooth = f"; thick: moving average over {w} positions, thin: raw" if w > 1 else ""
        fig.suptitle(
            f"{study.name}: few-step students vs the many-step teacher, per position"
            + (f"\n(thick: moving average over {w} positions; thin: raw)" if w > 1 else "")
        )
        _legend_outside(fig, axes)
    band = "band: 95% CI of the mean over seeds" if any(n > 1 for n in ns) else "one seed per curve"
    caption = (
        f"Per-position total variation distance and token agreement between few-step student rollouts and "
        f"many-step teacher rollouts from the same start states ({band}{smooth}). A rising TV curve means "
        "few-step errors compound along the sequence."
    )
    return [Drawn("fig_pos_divergence", "Per-position divergence to the teacher", caption, fig)]


# ---------------------------------------------------------------------------------------------- ablation
def ablation_budget(runs: pd.DataFrame) -> int:
    """The step budget shared by the most variants (labels); ties go to the larger budget (students are
    usually compared at their headline budget, e.g. 8 steps, rather than at the 1-step extreme)."""
    cover = runs.groupby("steps")["label"].nunique()
    best = cover.max()
    return int(max(s for s, c in cover.items() if c == best))


@FIGURES.register("ablation")
def ablation(study: Study, metrics: tuple | None = None) -> list[Drawn]:
    """Per method kind with several variants: bars of each variant at one step budget, 95% CI, seeds as dots."""

    metrics = shown("ablation") if metrics is None else metrics
    kinds = ablation_kinds(study)
    if not kinds:
        raise SkipFigure("no method kind has more than one variant (label) in this study")
    out = []
    for kind, labels in kinds.items():
        runs = study.models[(study.models["kind"] == kind) & study.models["steps"].notna()]
        ms = present(runs, metrics)
        if runs.empty or not ms:
            continue
        budget = ablation_budget(runs)
        at = runs[runs["steps"] == budget]
        bars = list(dict.fromkeys(zip(at["label"], at["rule"].astype(object).where(at["rule"].notna(), None))))
        multi_rule = len({r for _, r in bars}) > 1
        names = [_series_key(lab, r) if multi_rule else lab for lab, r in bars]
        colors = _palette(len(bars))
        ns = []
        with _style():
            fig, axes = _new_figure(len(ms), ncols=min(2, len(ms)), w=4.6, h=0.45 * len(bars) + 1.6)
            for ax, m in zip(axes, ms):
                y = np.arange(len(bars))
                for i, (lab, rule) in enumerate(bars):
                    sel = at[(at["label"] == lab) & ((at["rule"] == rule) if rule is not None else at["rule"].isna())]
                    v = pd.to_numeric(sel[m], errors="coerce").dropna().to_numpy(dtype=float)
                    if not len(v):
                        continue
                    ns.append(len(v))
                    sd = float(ci95_half_width(v.std(ddof=1), len(v))) if len(v) > 1 else 0.0
                    ax.barh(y[i], v.mean(), xerr=sd, color=colors[i], alpha=0.85, capsize=3, height=0.6)
                    ax.plot(
                        v,
                        np.full(len(v), y[i]),
                        "o",
                        color="black",
                        ms=3,
                        alpha=0.7,
                        label="one seed" if len(v) > 1 else None,
                    )
                ref = _data_mean(study, m)
                if ref is not None:
                    ax.axvline(ref, color="black", ls="--", lw=1.2, label=DATA_LABEL)
                ax.set_yticks(y)
                # variant names once per row of panels (left column), not repeated in every panel
                ax.set_yticklabels(names if ax.get_subplotspec().is_first_col() else [])
                ax.set_ylim(len(bars) - 0.5, -0.5)
                ax.set_xlabel(axis_label(m))
                ax.set_title(m)
            fig.suptitle(f"{study.name}: {kind} variants at {_steps_text(budget)} (mean, 95% CI over seeds)")
            _legend_outside(fig, axes)
        caption = (
            f"Ablation of {kind}: each variant at {_steps_text(budget)} (the budget most variants share); bars: mean, "
            f"error bars: 95% CI of the mean, dots: individual seeds ({_n_text(ns)}); dashed: data (held-out)."
        )
        out.append(Drawn(f"fig_ablation_{kind}", f"Ablation: {kind} variants", caption, fig))
    if not out:
        raise SkipFigure(f"the variants of {', '.join(kinds)} recorded none of {', '.join(metrics)}")
    return out


# ----------------------------------------------------------------------------------------------- writing
def render(name: str, study: Study, out_dir: Path) -> list[FigureResult]:
    """Draw figure kind `name` for `study` and write each figure as PNG and PDF under `out_dir`; a figure
    without data comes back as one `FigureResult` with `skipped` set and nothing written."""
    builder = FIGURES.get(name)
    try:
        drawn = builder(study)
    except SkipFigure as e:
        return [FigureResult(name=name, skipped=str(e))]
    out = []
    for d in drawn:
        paths = save_figure(d.figure, out_dir, d.name)
        out.append(FigureResult(name=d.name, title=d.title, caption=d.caption, paths=paths))
    return out


__all__ = [
    "FIGURES",
    "render",
    "divergence_curves",
    "step_sweep",
    "frontier",
    "pos_divergence",
    "ablation",
    "ablation_budget",
]
