"""Plotting helpers shared by the report's figures: `Figure` objects on an Agg canvas (never pyplot's global
state), panels, palettes, log axes, legends, axis labels from the metric registry, and writing PNG + PDF. The
figure types (`Drawn`, `FigureResult`, `SkipFigure`) live here too; which figures exist is `fsdfm.report.figures`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fsdfm.report.summary import Study, metric_info, summarize
from fsdfm.io import atomic_write

PANEL_W, PANEL_H = 4.2, 3.2
DPI = 150
_RULE_STYLES = ("-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
_RULE_MARKERS = ("o", "s", "^", "D")
# The metrics of the step-sweep and ablation figures and their axis labels are the registry's (views "sweep"
# and "ablation"; `MetricInfo.label`), read when a figure is drawn. The direction is said in words because an
# arrow glyph in a rotated y label reads as pointing sideways.


class SkipFigure(Exception):
    """A figure has no data to draw; the message says why (shown in the report index)."""


@dataclass(frozen=True)
class Drawn:
    """A drawn figure before it is written: file stem, title and caption for the index, the Figure."""

    name: str
    title: str
    caption: str
    figure: object


@dataclass(frozen=True)
class FigureResult:
    """A written figure (`paths`: PNG and PDF) or a skipped one (`skipped`: why)."""

    name: str
    title: str = ""
    caption: str = ""
    paths: tuple = ()
    skipped: str | None = None


# ------------------------------------------------------------------------------------------------ helpers
def axis_label(metric: str, direction: bool = True) -> str:
    """Axis label with the unit and the metric's goal (`MetricInfo.better`: "(lower is better)", "(closest to the
    data is better)" for entropy, distinct-n, self-BLEU and rep-n, as the tables rank them)."""
    info = metric_info(metric)  # sampling_wall_s reads wall_s's entry
    text = info.label or (f"{metric} ({info.unit})" if info.unit else metric)
    better = info.better if direction else None
    return f"{text}\n({better})" if better else text


def _new_figure(n_panels: int, ncols: int | None = None, w: float = PANEL_W, h: float = PANEL_H):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid")


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("colorblind", max(n, 1))


def _series_key(label, rule) -> str:
    return label if rule is None or pd.isna(rule) else f"{label} · {rule}"


def _log2_steps(ax, steps) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted({int(s) for s in steps})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)


def _plain_log(ax, which: str = "y") -> None:
    """Log scale with plain tick labels (30, 100, 0.1) instead of 3x10^1 (short ranges get minor labels)."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):  # label a few minor ticks on short ranges only, so that labels never collide
        lo, hi = axis.get_view_interval()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 99
        digits = "235" if decades < 1 else "25" if decades < 2 else ""
        return f"{v:g}" if f"{v:.1e}"[0] in digits else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def _shade(color, k: int, n: int):
    """`color` mixed with white: k = n - 1 (most steps) is the full colour, k = 0 the lightest (55%)."""
    if n <= 1:
        return color
    a = 0.55 + 0.45 * k / (n - 1)
    return tuple(a * c + (1 - a) for c in color[:3])


def _plot_series(ax, x, y, half, with_band: bool, color, k: int, key: str) -> None:
    """One (method, rule) series: a line in the rule's style and marker, and its 95% CI band when `with_band`
    (more than one seed: with one there is no spread to show)."""
    ax.plot(x, y, color=color, ls=_RULE_STYLES[k % 4], marker=_RULE_MARKERS[k % 4], ms=4, label=key)
    if with_band:
        ax.fill_between(x, y - half, y + half, color=color, alpha=0.18, lw=0)


def _steps_text(n) -> str:
    return f"{int(n)} step" + ("" if int(n) == 1 else "s")


def save_figure(fig, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `fig` as <stem>.png and <stem>.pdf atomically (render to memory, temp file, os.replace)."""

    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # no creation date: the same results give byte-identical PDFs
        meta = {"CreationDate": None} if ext == "pdf" else {}
        fig.savefig(buf, format=ext, dpi=DPI, metadata=meta)
        # the layout is solved on the first draw; keep it for the second format instead of solving it again
        fig.set_layout_engine("none")
        path = Path(out_dir) / f"{stem}.{ext}"
        atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths[0], paths[1]


def ci95_half_width(std, n: int, level: float = 0.95):
    """Half-width of the `level` Student-t interval of a mean of n values with sample std `std`:
    t_{(1 + level) / 2, n - 1} * std / sqrt(n) (array or float; NaN for n < 2)."""
    from scipy.stats import t

    if n < 2:
        return std * math.nan
    return t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)


def _setting_stats(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (label, rule, steps): mean, std, ci95 (half-width), n of `metric` (summarize, long rows of one metric)."""
    s = summarize(runs, ("label", "rule", "steps"), [metric])
    return s[s["metric"] == metric]


def _data_mean(study: Study, metric: str) -> float | None:
    d = study.data
    if d.empty or metric not in d:
        return None
    v = pd.to_numeric(d[metric], errors="coerce").dropna()
    return float(v.mean()) if len(v) else None


def _legend_outside(fig, axes, where: str = "right") -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if not handles:
        return
    # below the axes: two columns only when the labels are short enough to sit side by side
    two = where != "right" and max(map(len, labels)) <= 40
    loc, ncols = ("outside right center", 1) if where == "right" else ("outside lower center", 2 if two else 1)
    legend = fig.legend([handles[lab] for lab in labels], labels, loc=loc, ncols=ncols, frameon=False)
    fit_legend(fig, legend)


def fit_legend(fig, legend) -> None:
    """Widen (and heighten) the figure until the legend lies inside it: constrained layout places an outside
    legend but never grows the figure, so long labels were cut at the edges (the claims frontier figure)."""
    for _ in range(3):
        fig.canvas.draw()
        box, page = legend.get_window_extent(), fig.bbox
        over_w = max(0.0, page.x0 - box.x0) + max(0.0, box.x1 - page.x1)
        over_h = max(0.0, page.y0 - box.y0) + max(0.0, box.y1 - page.y1)
        if over_w <= 0.5 and over_h <= 0.5:
            return
        fig.set_size_inches(
            fig.get_figwidth() + (over_w + 12) / fig.dpi * (over_w > 0.5),
            fig.get_figheight() + (over_h + 12) / fig.dpi * (over_h > 0.5),
        )


def _n_text(ns) -> str:
    ns = sorted({int(n) for n in ns})
    return "1 seed" if ns == [1] else f"n = {ns[0]}" + (f"–{ns[-1]}" if len(ns) > 1 else "") + " seeds"
