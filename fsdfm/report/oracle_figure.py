"""The figure of the oracle decomposition (`fsdfm.report.oracle`): oracle_nll vs N and its two CE excess terms."""

from __future__ import annotations

import itertools

import pandas as pd

from fsdfm.report.oracle import EXACT_KIND, JOINT_KIND, _mean, decomposition_frame
from fsdfm.report.summary import Study

__all__ = ["decomposition_figure"]


def decomposition_figure(study: Study):
    """Per path source: oracle_nll vs N (exact and trained methods; expected NLL, entropy rate and the data row
    marked), and below it the two CE excess terms vs N (model: per method, colour; exact sampler: black), log2 x axis."""
    from fsdfm.report.plotting import (  # heavy: matplotlib (the analysis extra)
        PANEL_W,
        Drawn,
        SkipFigure,
        _legend_outside,
        _log2_steps,
        _new_figure,
        _palette,
        _style,
    )

    frame = decomposition_frame(study)
    # only runs on a mixture path have an exact sampler to split against (not FLM/FMLM, not the naive rows)
    frame = frame[frame["source"] != "?"] if not frame.empty else frame
    if frame.empty:
        raise SkipFigure("no exact runs to decompose against")
    sources = list(dict.fromkeys(frame["source"]))
    labels = list(dict.fromkeys(frame["label"]))
    colors = dict(zip(labels, _palette(len(labels))))
    styles = {r: s for r, s in zip(dict.fromkeys(frame["rule"]), itertools.cycle(("-", "--", ":", "-.")))}
    data_nll = _mean(study.data["oracle_nll"]) if not study.data.empty and "oracle_nll" in study.data else None
    with _style():
        fig, axes = _new_figure(2 * len(sources), ncols=len(sources), w=1.5 * PANEL_W)
        top, bottom = axes[: len(sources)], axes[len(sources) :]
        for j, src in enumerate(sources):
            _draw_source(top[j], bottom[j], src, frame[frame["source"] == src], colors, styles, data_nll, _log2_steps)
        fig.suptitle(f"{study.name}: CE excess = model CE excess + exact sampler CE excess (seed means)")
        _legend_outside(fig, axes)
    caption = (
        "Top: oracle_nll against the step budget for the exact denoiser and each trained method, with the "
        "expected NLL of true sequences (dashed), the entropy rate (dotted) and the held-out data row. "
        "Bottom: model CE excess oracle_nll(M, N) − oracle_nll(exact, N) per method (colour) and the exact "
        "sampler's CE excess oracle_nll(exact, N) − H_L (black), same rule: cross-entropy differences, not "
        "divergences (fsdfm.report.oracle)."
    )
    return [Drawn("fig_decomposition", "Few-step error decomposition", caption, fig)]


def _draw_source(top, bottom, src: str, f: pd.DataFrame, colors: dict, styles: dict, data_nll, log2_steps) -> None:
    """One path source's two panels: oracle_nll vs N with the reference lines (top), the CE excess terms (bottom)."""
    for (label, rule), g in f.groupby(["label", "rule"], sort=False):
        g = g.sort_values("steps")
        x = g["steps"].to_numpy(float)
        top.plot(
            x,
            g["oracle_nll_mean"],
            color=colors[label],
            ls=styles[rule],
            marker="o",
            ms=3,
            label=f"{label} · {rule}",
        )
        if (~g["kind"].isin([EXACT_KIND, JOINT_KIND])).any():
            bottom.plot(
                x,
                g["model_ce_excess"],
                color=colors[label],
                ls=styles[rule],
                marker="o",
                ms=3,
                label=f"{label} · {rule}",
            )
        else:
            bottom.plot(
                x,
                g["exact_ce_excess"],
                color="black",
                ls=styles[rule],
                marker="s",
                ms=3,
                label=f"exact sampler CE excess · {rule}",
            )
    top.axhline(_mean(f["expected_nll"]), color="black", ls="--", lw=1, label="expected NLL H_L")
    top.axhline(_mean(f["entropy_rate"]), color="gray", ls=":", lw=1, label="entropy rate")
    if data_nll is not None:
        top.axhline(data_nll, color="tab:green", ls="-.", lw=1, label="data (held-out)")
    bottom.axhline(0.0, color="gray", lw=0.8)
    for ax in (top, bottom):
        log2_steps(ax, f["steps"])
        ax.set_xlabel("sampling steps N (log2 scale)")
    top.set_yscale("log")
    top.set_ylabel("oracle_nll (nats/token, log scale)")
    top.set_title(f"{src}: oracle_nll")
    bottom.set_ylabel("CE excess term (nats/token)")
    bottom.set_title(f"{src}: CE excess terms")
