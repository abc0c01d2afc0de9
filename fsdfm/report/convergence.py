"""Convergence, shown: the held-out curves training stages record (`optim.curve_every` / `optim.until`,
fsdfm.train.fit) as a figure (`fig_convergence`) and a long table (`convergence_frame`).

One panel per curve metric (val_nll, val_ce, posterior_kl, posterior_kl_h<h> ...), one line per training stage,
coloured by the method label of the runs sampled from it, the step at which a stopping rule ended training marked.
Reads the plan (which stage trained the model behind each run) and the training records only.
"""

from __future__ import annotations

import pandas as pd

from fsdfm.report.summary import Study
from fsdfm.records import read_record, stage_dir
from fsdfm.report.oracle import model_stage

__all__ = ["convergence_figure", "convergence_frame"]


def convergence_frame(study: Study) -> pd.DataFrame:
    """Long table: stage_id, label (of the runs sampled from the stage), step, metric, value, stopped_at."""

    runs = study.models
    labels: dict[str, str] = {}
    if len(runs) and "stage_id" in runs:
        for sid, label in zip(runs["stage_id"], runs["label"]):
            m = model_stage(study.plan, sid)
            if m is not None:
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
