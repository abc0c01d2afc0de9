"""Comparisons at matched entropy: the gen-PPL-entropy frontier figure and the matched-entropy table.

A *family* is one model kind, rule and step budget sampled at several temperature / top-p settings (the other knobs
equal): its points (entropy_nats, gen_ppl), one per setting, trace the family's frontier. A single gen-PPL point can
be bought with entropy (a lower temperature lowers both), so methods are compared at the same entropy:

    gen_ppl*(H) = exp( interpolation in H of log gen_ppl between the two settings whose mean entropies bracket H )

at H = the data row's entropy (or a stated common entropy), linear in log gen-PPL between neighbouring settings
(no extrapolation: a family whose sweep does not reach H reports nothing there). The CI is a bootstrap over training
seeds: seeds resampled with replacement (B = 2,000, seeded), the per-setting means recomputed, the interpolation
redone; the 2.5 / 97.5 percentiles.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from fsdfm.report.table import Table

SWEEP_KNOBS = ("temperature", "top_p")
N_BOOT = 2000


def parse_knobs(text) -> dict:
    """'temperature=0.7,top_p=0.9' -> {'temperature': '0.7', 'top_p': '0.9'} (empty for NaN / '')."""
    if not isinstance(text, str) or not text:
        return {}
    return dict(item.split("=", 1) for item in text.split(","))


def families(runs: pd.DataFrame, y: str = "gen_ppl", x: str = "entropy_nats") -> pd.DataFrame:
    """Runs with a family key and their sweep setting: columns family, setting, seed, x, y (one row per run)."""
    if runs.empty or x not in runs or y not in runs:
        return pd.DataFrame(columns=["family", "setting", "seed", "x", "y"])
    out = []
    for _, r in runs.iterrows():
        kn = parse_knobs(r.get("knobs"))
        fixed = ",".join(f"{k}={v}" for k, v in sorted(kn.items()) if k not in SWEEP_KNOBS)
        setting = ",".join(f"{k}={kn[k]}" for k in SWEEP_KNOBS if k in kn) or "T=1"
        family = f"{r.get('kind')} / {r.get('rule')} / {int(r['steps'])} steps" + (f" / {fixed}" if fixed else "")
        seed = r.get("seed", 0)
        out.append({"family": family, "setting": setting, "seed": seed, "x": float(r[x]), "y": float(r[y])})
    df = pd.DataFrame(out)
    return df[np.isfinite(df["x"]) & np.isfinite(df["y"]) & (df["y"] > 0)]


def interpolate_log(xs: np.ndarray, ys: np.ndarray, at: float) -> float:
    """exp of the linear interpolation of log ys in xs at `at`; NaN outside [min xs, max xs] (no extrapolation)."""
    order = np.argsort(xs)
    xs, ly = np.asarray(xs)[order], np.log(np.asarray(ys)[order])
    if len(xs) < 2 or not xs[0] <= at <= xs[-1]:
        return float("nan")
    return float(np.exp(np.interp(at, xs, ly)))


def matched(fam: pd.DataFrame, at: float, seed: int = 0) -> dict:
    """gen-PPL of one family at entropy `at`, with the seed-bootstrap CI: {value, lo, hi, n_settings, n_seeds}."""
    xs = fam.pivot_table(index="seed", columns="setting", values="x", aggfunc="mean")
    ys = fam.pivot_table(index="seed", columns="setting", values="y", aggfunc="mean").reindex_like(xs)
    X, Y = xs.to_numpy(dtype=float), ys.to_numpy(dtype=float)  # (seeds, settings), NaN where a seed lacks one
    value = interpolate_log(np.nanmean(X, 0), np.nanmean(Y, 0), at)
    rng = np.random.default_rng(seed)
    boot = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a setting: its mean is NaN, dropped
        for _ in range(N_BOOT if X.shape[0] > 1 else 0):
            pick = rng.integers(0, X.shape[0], X.shape[0])
            mx, my = np.nanmean(X[pick], 0), np.nanmean(Y[pick], 0)
            ok = np.isfinite(mx) & np.isfinite(my)
            boot.append(interpolate_log(mx[ok], my[ok], at))
    boot = np.array([b for b in boot if np.isfinite(b)])
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"), float("nan"))
    return {"value": value, "lo": float(lo), "hi": float(hi), "n_settings": X.shape[1], "n_seeds": X.shape[0]}


def matched_entropy_table(runs: pd.DataFrame, data_entropy: float | None, at: float | None = None) -> Table:
    """One row per family with >= 2 sweep settings: gen-PPL at the data's entropy (or at `at`) with its CI."""
    target = at if at is not None else data_entropy
    fams = families(runs)
    rows, numbers = [], []
    if target is not None:
        for name, fam in fams.groupby("family", sort=False):
            if fam["setting"].nunique() < 2:
                continue
            m = matched(fam, target)
            ci = (
                "outside the sweep"
                if not np.isfinite(m["value"])
                else f"{m['value']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"
            )
            rows.append((name, f"{m['n_settings']}", f"{m['n_seeds']}", ci))
            numbers.append({"family": name, "entropy": target, **m})
    what = "the data's entropy" if at is None else "the stated entropy"
    notes = (
        f"gen-PPL interpolated (linear in log gen-PPL) at {what} H = {target:.3f} nats between the temperature / top-p "
        f"settings bracketing it; 95% CI: bootstrap over training seeds (B = {N_BOOT})" if target is not None else
        "no data row with entropy_nats: nothing to match",
    )  # fmt: skip
    return Table(
        name="table_matched_entropy",
        title="Gen-PPL at matched entropy",
        columns=("family (kind / rule / steps)", "settings", "seeds", "gen-PPL at H [95% CI]"),
        cells=tuple(rows),
        bold=tuple((False,) * 4 for _ in rows),
        sections=(),
        notes=notes,
        numbers=pd.DataFrame(numbers),
        n_label_columns=3,
    )


def entropy_frontier(study) -> list:
    """gen_ppl (log y) vs entropy_nats per family, one point per temperature / top-p setting (mean over seeds,
    ±1 std error bars), the data row as a star; families with one setting are drawn as single points."""
    # heavy: matplotlib (the analysis extra); tables are written without it
    from fsdfm.report.plotting import Drawn, SkipFigure, _legend_outside, _new_figure, _palette, _plain_log, _style

    fams = families(study.models)
    if fams.empty:
        raise SkipFigure("no run has both gen_ppl and entropy_nats")
    if fams.groupby("family")["setting"].nunique().max() < 2:
        raise SkipFigure("no temperature / top-p sweep (every family has one setting)")
    stats = fams.groupby(["family", "setting"], sort=False).agg(
        x=("x", "mean"), y=("y", "mean"), sx=("x", "std"), sy=("y", "std"), n=("x", "size")
    )
    names = list(dict.fromkeys(fams["family"]))
    colors = dict(zip(names, _palette(len(names))))
    with _style():
        fig, (ax,) = _new_figure(1, w=7.5, h=5.0)
        for name in names:
            g = stats.loc[name].sort_values("x")
            ax.errorbar(g["x"], g["y"], xerr=g["sx"].fillna(0), yerr=g["sy"].fillna(0), color=colors[name],
                        marker="o", ms=4, capsize=2, label=name)  # fmt: skip
        d = study.data
        if not d.empty and {"gen_ppl", "entropy_nats"} <= set(d):
            ax.plot(d["entropy_nats"].mean(), d["gen_ppl"].mean(), "k*", ms=12, label="data (held-out)")
        _plain_log(ax, "y")
        ax.set_xlabel("entropy per sample (nats)")
        ax.set_ylabel("gen-PPL (log scale)")
        ax.set_title(f"{study.name}: gen-PPL-entropy frontier (temperature / top-p sweeps)")
        _legend_outside(fig, [ax], where="bottom")
    caption = (
        "gen-PPL against per-sample entropy, one curve per model kind / rule / step budget through its temperature and "
        "top-p settings (means over training seeds, ±1 std); compare curves at equal entropy, not single points."
    )
    return [Drawn("fig_entropy_frontier", "Gen-PPL-entropy frontier", caption, fig)]
