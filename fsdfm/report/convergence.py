"""Convergence, shown: the held-out curves training stages record (`optim.curve_every` / `optim.until`,
fsdfm.train.fit) as a figure (`fig_convergence`), a long table (`convergence_frame`) and a summary of how far each
method's training was from a plateau (`convergence_table`).

One panel per curve metric (val_nll, val_ce, posterior_kl, posterior_kl_h<h> ...), one line per training stage,
coloured by the method label of the runs sampled from it, the step at which a stopping rule ended training marked.
Reads the plan (which stage trained the model behind each run) and the training records only.
"""

from __future__ import annotations

import math

import pandas as pd

from fsdfm.report.summary import Study
from fsdfm.records import read_record, stage_dir
from fsdfm.report.oracle import model_stage
from fsdfm.report.table import DASH, Table

__all__ = ["convergence_figure", "convergence_frame", "convergence_table"]

LAST_PART = 0.25  # the window whose change says whether a curve was still moving: its last quarter of steps


def convergence_frame(study: Study) -> pd.DataFrame:
    """Long table: stage_id, label (of the runs sampled from the stage), step, metric, value, stopped_at."""

    runs = study.models
    labels: dict[str, str] = {}
    pairs = zip(runs["stage_id"], runs["label"]) if len(runs) and "stage_id" in runs else ()
    # the finished runs' labels (which name ablated grid values), then the planned runs' for models none finished
    planned = ((r["stage_id"], (r.get("params") or {}).get("label")) for r in study.plan.get("runs", []))
    for sid, label in (*pairs, *planned):
        m = model_stage(study.plan, sid)
        if m is not None and label is not None:
            labels.setdefault(m, str(label))
    rows = []
    for sid, st in study.plan.get("stages", {}).items():
        if not str(st.get("kind", "")).startswith(("train", "distil")):
            continue
        payload = (read_record(stage_dir(study.path, sid), warn=False) or {}).get("payload") or {}
        for point in payload.get("curve") or []:
            for metric, value in point.items():
                if metric != "step":
                    rows.append(
                        {
                            "stage_id": sid,
                            "label": labels.get(sid, st.get("kind")),
                            "step": int(point["step"]),
                            "metric": metric,
                            "value": float(value),
                            "stopped_at": payload.get("stopped_at"),
                        }
                    )
    return pd.DataFrame(rows)


def _last_part_change(g: pd.DataFrame) -> tuple[int, int, float, float]:
    """One stage's curve -> (last step, window start, value at the last step, change over the window), the window
    starting at the last point at or before (1 - LAST_PART) x the last step. A sparse curve with no such point
    (300 steps recorded every 250: points at 250 and 300) falls back to its last interval, the shortest window it
    can give, and the table shows that window; a one-point curve has no change (NaN)."""
    g = g.sort_values("step")
    last_step, v_last = int(g["step"].iloc[-1]), float(g["value"].iloc[-1])
    before = g[g["step"] <= (1 - LAST_PART) * last_step]
    if before.empty:
        before = g.iloc[:-1]
    if before.empty:
        return last_step, last_step, v_last, math.nan
    return last_step, int(before["step"].iloc[-1]), v_last, v_last - float(before["value"].iloc[-1])


def convergence_table(study: Study, frame: pd.DataFrame | None = None) -> Table:
    """Per method and curve metric, over its training stages (seeds): the last value, its change over the last
    quarter of training (delta = v(last) - v(start of the window)) and whether it was still falling: mean delta
    below zero by more than 2 standard errors over stages (n >= 2; with one stage no call is made).
    frame: `convergence_frame(study)` where the caller has it already (it reads every training record)."""
    rows = []
    frame = convergence_frame(study) if frame is None else frame
    for (label, metric), g in frame.groupby(["label", "metric"], sort=False):
        per = pd.DataFrame(
            [_last_part_change(s) for _, s in g.groupby("stage_id", sort=False)],
            columns=["steps", "from_step", "last", "delta"],
        )
        n, d = len(per), per["delta"].dropna()
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) >= 2 else math.nan
        falling = DASH if se != se else ("yes" if d.mean() < -2 * se else "no")
        rows.append(
            {"label": label, "metric": metric, "n": n, "steps": int(per["steps"].max()),
             "from_step": int(per["from_step"].min()), "last_mean": per["last"].mean(),
             "last_std": per["last"].std(ddof=1), "delta_mean": d.mean() if len(d) else math.nan,
             "delta_std": d.std(ddof=1), "delta_pct": 100 * d.mean() / abs(per["last"].mean()) if len(d) else math.nan,
             "still_falling": falling}
        )  # fmt: skip
    numbers = pd.DataFrame(rows)

    def pm(mean: float, std: float) -> str:
        return DASH if mean != mean else (f"{mean:.4f}" + ("" if std != std else f" ± {std:.4f}"))

    cells = tuple(
        (r["label"], r["metric"], str(r["n"]), f"{r['from_step']}–{r['steps']}", pm(r["last_mean"], r["last_std"]),
         pm(r["delta_mean"], r["delta_std"]), DASH if r["delta_pct"] != r["delta_pct"] else f"{r['delta_pct']:+.2f}",
         r["still_falling"])
        for r in rows
    )  # fmt: skip
    cols = ("method", "metric", "n", "last quarter (steps)", "last value", "Δ last quarter", "Δ %", "still falling")
    notes = (
        "one value per training stage (a training seed), mean ± std over them; Δ: the held-out metric's change "
        "from the window's first step to the last (negative: still improving, for these lower-is-better curves)",
        "still falling: mean Δ < 0 by more than 2 standard errors over stages; — with one stage (no call made) or "
        "a one-point curve; a curve with no point in its first three quarters is measured over its last interval "
        "(the window shown)",
    )
    return Table(
        name="table_convergence",
        title=f"{study.name}: how far training was from a plateau (held-out curves, last quarter)",
        columns=cols,
        cells=cells,
        bold=tuple((False,) * len(cols) for _ in cells),
        sections=(),
        notes=notes,
        numbers=numbers,
        n_label_columns=2,
    )


def convergence_figure(study: Study):
    # heavy: matplotlib (the analysis extra); tables are written without it
    from fsdfm.report.plotting import Drawn, SkipFigure, _legend_outside, _new_figure, _palette, _style

    df = convergence_frame(study)
    if df.empty:
        raise SkipFigure("no training curves recorded (set optim.curve_every or optim.until in the spec)")
    metrics = list(dict.fromkeys(df["metric"]))
    labels = list(dict.fromkeys(df["label"]))
    colors = dict(zip(labels, _palette(len(labels))))
    with _style():
        fig, axes = _new_figure(len(metrics))
        for ax, metric in zip(axes, metrics):
            part = df[df["metric"] == metric]
            for (sid, label), g in part.groupby(["stage_id", "label"], sort=False):
                g = g.sort_values("step")
                ax.plot(g["step"], g["value"], color=colors[label], marker="o", ms=2, lw=1, label=label)
                stop = g["stopped_at"].iloc[0]
                if stop == stop and stop is not None:
                    ax.axvline(float(stop), color=colors[label], ls=":", lw=0.8)
            ax.set_xlabel("training step")
            ax.set_ylabel(metric)
            ax.set_title(metric)
        fig.suptitle(f"{study.name}: held-out curves along training")
        _legend_outside(fig, axes)
    caption = (
        "Held-out metrics recorded along training (one line per training stage, i.e. per training seed; colour: "
        "the method trained); dotted: the step a stopping rule (optim.until) ended training. A curve still "
        "falling at its last point is not converged."
    )
    return [Drawn("fig_convergence", "Convergence", caption, fig)]
