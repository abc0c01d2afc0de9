"""The `quality_vs_nfe` figure: sample quality against the number of model calls (NFE, number of function
evaluations), the cost axis that does not depend on the machine's load (wall-clock does).

One panel per quality metric of the registry's "sweep" view that the study recorded, x = mean NFE of a setting
(log2 axis), y = its mean over seeds with a 95% Student-t band (mean ± t_{0.975, n-1} s / sqrt(n)), one line per
(label, rule); the data row as a dashed line. A student at 8 steps and its teacher at 8 steps share x = 8: the
question "how much quality per model call" is read off vertically.
"""

from __future__ import annotations

import pandas as pd

from fsdfm.metrics.registry import shown
from fsdfm.report.plotting import (
    _plot_series,
    Drawn,
    SkipFigure,
    _data_mean,
    _legend_outside,
    _n_text,
    _new_figure,
    _palette,
    _plain_log,
    _series_key,
    _style,
    axis_label,
    ci95_half_width,
)
from fsdfm.report.summary import DATA_LABEL, Study, metric_info, present, summarize

NFE = "nfe"


def quality_vs_nfe(study: Study, metrics: tuple | None = None) -> list[Drawn]:
    """Each quality metric vs NFE (log2 x), mean and 95% CI over seeds per (label, rule); data dashed."""
    runs = study.models
    if runs.empty or not present(runs, [NFE]):
        raise SkipFigure("no model run recorded its number of function evaluations (nfe)")
    # a run with no model call (NFE 0: a model-free sanity row) has no place on a log axis; the main table shows it
    no_calls = pd.to_numeric(runs[NFE], errors="coerce").le(0)
    runs = runs[~no_calls]
    wanted = shown("sweep") if metrics is None else metrics
    metrics = [m for m in present(runs, wanted) if m != NFE]
    if not metrics:
        raise SkipFigure(f"none of {', '.join(wanted)} was recorded")
    by = ("label", "rule", "steps")
    st = summarize(runs, by, [NFE, *metrics])
    x_st = st[st["metric"] == NFE][[*by, "mean"]].rename(columns={"mean": "nfe"})
    if x_st["nfe"].nunique() < 2:
        raise SkipFigure("every run made the same number of model calls; nothing to plot against")
    series = list(dict.fromkeys(zip(x_st["label"], x_st["rule"].astype(object).where(x_st["rule"].notna(), None))))
    labels = list(dict.fromkeys(lab for lab, _ in series))
    rules = list(dict.fromkeys(r for _, r in series))
    colors = dict(zip(labels, _palette(len(labels))))
    ns: list[int] = []
    with _style():
        fig, axes = _new_figure(len(metrics))
        for ax, m in zip(axes, metrics):
            y_st = st[st["metric"] == m].merge(x_st, on=list(by))
            for label, rule in series:
                sel = y_st[
                    (y_st["label"] == label) & (y_st["rule"] == rule if rule is not None else y_st["rule"].isna())
                ]
                sel = sel.sort_values("nfe")
                if sel.empty:
                    continue
                x, y = sel["nfe"].to_numpy(float), sel["mean"].to_numpy(float)
                half = [ci95_half_width(s, int(n)) if n > 1 else 0.0 for s, n in zip(sel["std"], sel["n"])]
                ns += [int(n) for n in sel["n"]]
                band = bool((sel["n"] > 1).any())
                _plot_series(ax, x, y, half, band, colors[label], rules.index(rule), _series_key(label, rule))
            ref = _data_mean(study, m)
            if ref is not None:
                ax.axhline(ref, color="black", ls="--", lw=1.2, label=DATA_LABEL)
            ax.set_xscale("log", base=2)
            if metric_info(m).unit == "ppl":
                _plain_log(ax, "y")
            ax.set_xlabel("model calls per sample (NFE, log2 scale)")
            ax.set_ylabel(axis_label(m))
            ax.set_title(m)
        band = "band: 95% CI of the mean over seeds" if any(n > 1 for n in ns) else "single seed per point"
        fig.suptitle(f"{study.name}: sample quality vs number of model calls (mean; {band})")
        _legend_outside(fig, axes)
    caption = (
        "Each metric against the number of network evaluations per sample (NFE, log2 axis), one line per method · "
        f"update rule; {band} ({_n_text(ns)}); dashed black: data (held-out) reference."
        + (" Runs with no model call (NFE 0) are in the main table only." if no_calls.any() else "")
    )
    return [Drawn("fig_quality_vs_nfe", "Quality vs number of model calls (NFE)", caption, fig)]
