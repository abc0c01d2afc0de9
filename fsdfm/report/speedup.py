"""The quality-matched speed-up: at which teacher budget N* does the teacher reach the student's quality?

FS-DFM's claim is a speed-up at equal quality ("8 steps match 1,024"). For a student sampled with k steps and
its teacher sampled at budgets N_1 < ... < N_m, each quality metric is put on a lower-is-better score
z (z = x for direction "min", z = -x for "max"; perplexities on the log scale, log ppl = NLL per token, so that
the interpolation is in nats) and the teacher's mean curve z_T(N) is interpolated linearly in log2 N:

    N*  = the smallest N in [N_1, N_m] with z_T(N) = z_S(k)        (first crossing: the conservative speed-up)
    speed-up in NFE        = NFE_T(N*) / NFE_S(k)                  (NFE_T interpolated on log-log; = N*/k)
    speed-up in wall-clock = wall_T(N*) / wall_S(k)                (measured sampling time, log-log interpolation)

When the teacher's fewest steps already match the student (z_T(N_1) <= z_S) N* is "<= N_1", and when the
student beats the teacher at every budget (z_T(N) > z_S for all N) N* is "> N_m": no N* in range, and the
speed-up is only bounded. The unit of replication is the student's training stage (a training seed) with its
own teacher (the stage it distilled): the point estimate averages the curves over units, and the 95% interval
is a percentile bootstrap over units (resampled with replacement, teacher and student together, so the pairing
of a student with its teacher is kept). A censored draw counts as -inf / +inf, so an interval can be one-sided.

`matched_budget` is the computation on plain curves; `speedup_table` finds the student/teacher pairs of a study
from its plan (a distil stage's `teacher` input) and tabulates every directed main metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from fsdfm.report.summary import SAMPLING_WALL_S, Study
from fsdfm.report.table import DASH, Table
from fsdfm.report.summary import metric_info
from fsdfm.metrics.registry import shown
from fsdfm.report.summary import present
from fsdfm.report.oracle import model_stage
from fsdfm.samplers import UPDATE_ALIASES

__all__ = ["Crossing", "MatchedBudget", "crossing", "matched_budget", "speedup_frame", "speedup_table"]

N_BOOT = 2000
LEVEL = 0.95
IN_RANGE, BELOW, ABOVE = "in range", "below range", "above range"


@dataclass(frozen=True)
class Crossing:
    """Where a lower-is-better curve first reaches a target: `n_star` (budget; the range's end when censored)
    and `status` (IN_RANGE, BELOW: the curve starts at or under the target, ABOVE: never reaches it)."""

    n_star: float
    status: str


def crossing(budgets: Sequence[float], z: Sequence[float], target: float) -> Crossing:
    """The first budget at which the lower-is-better curve z(N), linear in log2 N between the given points,
    reaches `target`.

    Args:
        budgets: (m,) increasing budgets N_j > 0.  z: (m,) the curve's values at them.  target: the level.
    Returns:
        Crossing(N*, status); status BELOW when z(N_1) <= target (N* <= N_1), ABOVE when z(N) > target at every
        budget (N* > N_m).
    """
    b = np.log2(np.asarray(budgets, dtype=float))
    z = np.asarray(z, dtype=float)
    if len(b) == 0 or not math.isfinite(target):
        return Crossing(math.nan, ABOVE)
    if z[0] <= target:
        return Crossing(float(2 ** b[0]), BELOW if z[0] < target else IN_RANGE)
    for j in range(1, len(b)):
        if z[j] <= target:  # z[j-1] > target >= z[j]: interpolate inside this segment
            frac = (z[j - 1] - target) / (z[j - 1] - z[j])
            return Crossing(float(2 ** (b[j - 1] + frac * (b[j] - b[j - 1]))), IN_RANGE)
    return Crossing(float(2 ** b[-1]), ABOVE)


def _loglog(budgets: np.ndarray, y: np.ndarray, n: float) -> float:
    """y(N) interpolated linearly in (log N, log y); NaN outside the range or with a non-positive y."""
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 1 or not math.isfinite(n):
        return math.nan
    lb, ly = np.log(budgets[ok]), np.log(y[ok])
    if not lb[0] - 1e-9 <= math.log(n) <= lb[-1] + 1e-9:
        return math.nan
    return float(np.exp(np.interp(math.log(n), lb, ly)))


@dataclass(frozen=True)
class MatchedBudget:
    """The teacher budget matching a student at k steps on one metric.

    n_star / status: the point estimate (`Crossing`); ci: (low, high) 95% bootstrap percentiles of N* (-inf /
    inf: censored draws at that end; NaN with one unit); speedup_nfe (+ ci) = NFE_T(N*) / NFE_S(k);
    speedup_wall = wall_T(N*) / wall_S(k) (NaN when censored or not measured); n_units: replicates (training
    stages); budgets: the teacher budgets the curve has."""

    k: int
    student_z: float
    n_star: float
    status: str
    ci: tuple
    speedup_nfe: float
    speedup_nfe_ci: tuple
    speedup_wall: float
    n_units: int
    budgets: tuple


def _mean_curve(curves: Sequence[Mapping[int, float]], budgets: Sequence[int]) -> np.ndarray:
    return np.array([np.nanmean([c.get(n, math.nan) for c in curves]) for n in budgets], dtype=float)


def _percentiles(draws: Sequence[float]) -> tuple:
    """The (1 - LEVEL)/2 and (1 + LEVEL)/2 order statistics (np.quantile would interpolate inf - inf = NaN)."""
    x = np.sort(np.asarray(draws, dtype=float))
    return tuple(float(x[min(int(q * len(x)), len(x) - 1)]) for q in ((1 - LEVEL) / 2, (1 + LEVEL) / 2))


def matched_budget(
    teacher: Sequence[Mapping[int, float]],
    student: Sequence[float],
    k: int,
    teacher_nfe: Mapping[int, float] | None = None,
    student_nfe: float | None = None,
    teacher_wall: Mapping[int, float] | None = None,
    student_wall: float | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> MatchedBudget:
    """N* for one student budget k from per-unit curves (lower-is-better scores z; see the module docstring).

    Args:
        teacher: per unit i, {N: z_T,i(N)} (a unit may lack a budget; the mean curve uses the units that have it).
        student: per unit i (paired with teacher[i]), z_S,i(k).
        teacher_nfe / student_nfe: NFE per budget (default NFE = N, and k); teacher_wall / student_wall: mean
            sampling seconds (optional).
        n_boot, seed: bootstrap draws and their generator's seed.
    Returns:
        a `MatchedBudget`.
    """
    if len(teacher) != len(student) or not len(student):
        raise ValueError(f"matched_budget: {len(teacher)} teacher curves for {len(student)} student values")
    budgets = sorted({int(n) for c in teacher for n in c})
    student = np.asarray(student, dtype=float)
    point = crossing(budgets, _mean_curve(teacher, budgets), float(np.nanmean(student)))
    bnd = np.asarray(budgets, dtype=float)
    nfe_t = np.array([(teacher_nfe or {}).get(n, n) for n in budgets], dtype=float)
    nfe_s = float(student_nfe if student_nfe is not None else k)

    def nfe_ratio(c: Crossing) -> float:
        """NFE_T(N*) / NFE_S(k); a censored crossing is a bound, not a value: -inf / +inf."""
        if c.status != IN_RANGE:
            return -math.inf if c.status == BELOW else math.inf
        return _loglog(bnd, nfe_t, c.n_star) / nfe_s

    n_units = len(student)
    ci = sp_ci = (math.nan, math.nan)
    if n_units > 1:
        rng = np.random.default_rng(seed)
        draws, ratios = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, n_units, n_units)
            c = crossing(budgets, _mean_curve([teacher[i] for i in idx], budgets), float(np.nanmean(student[idx])))
            draws.append(c.n_star if c.status == IN_RANGE else nfe_ratio(c))
            ratios.append(nfe_ratio(c))
        ci, sp_ci = _percentiles(draws), _percentiles(ratios)
    wall = math.nan
    if point.status == IN_RANGE and teacher_wall and student_wall and student_wall > 0:
        wall_t = np.array([teacher_wall.get(n, math.nan) for n in budgets], dtype=float)
        wall = _loglog(bnd, wall_t, point.n_star) / student_wall
    return MatchedBudget(
        k=int(k),
        student_z=float(np.nanmean(student)),
        n_star=point.n_star,
        status=point.status,
        ci=ci,
        speedup_nfe=nfe_ratio(point) if point.status == IN_RANGE else math.nan,
        speedup_nfe_ci=sp_ci,
        speedup_wall=wall,
        n_units=n_units,
        budgets=tuple(budgets),
    )


# ------------------------------------------------------------------------------------------- a study's pairs
def _score_fn(metric: str):
    """Value -> lower-is-better score, and back (perplexities on the log scale); None when undirected."""

    info = metric_info(metric)
    if info.direction not in ("min", "max") or info.target == "data":
        return None
    sign = 1.0 if info.direction == "min" else -1.0
    if info.unit == "ppl":
        return (lambda x: sign * np.log(x)), (lambda z: math.exp(sign * z))
    return (lambda x: sign * np.asarray(x, dtype=float)), (lambda z: sign * z)


def speedup_metrics(study: Study) -> list[str]:
    """The metrics matched: the main view's directed metrics the study recorded (oracle_nll among them)."""

    return [m for m in present(study.models, shown("main")) if _score_fn(m) is not None]


def _units(study: Study) -> pd.DataFrame:
    """Model runs annotated with `model_stage` and, for distilled students, `teacher_stage` (plan inputs)."""

    runs = study.models.copy()
    if runs.empty:
        return runs
    runs["model_stage"] = [model_stage(study.plan, s) for s in runs["stage_id"]]
    runs["teacher_stage"] = [
        ((study.plan["stages"].get(m) or {}).get("inputs") or {}).get("teacher") if m else None
        for m in runs["model_stage"]
    ]
    return runs


def _canonical(rule: str) -> str:

    return UPDATE_ALIASES.get(rule, rule)


def _combos(runs: pd.DataFrame) -> list[tuple]:
    """(student label, rule, its runs, teacher rule, teacher knobs) for each student setting against every setting
    its teacher was sampled with: its own (rule up to alias, knobs) first, the rest sorted (no set order). A teacher
    setting is a rule and its sampler knobs: two knob variants of one rule are two curves, not one. Only a teacher
    setting sampled at two budgets or more is a curve N* can be read from: a knob sweep at one budget (a temperature
    sweep at 8 steps) is not compared here (the matched-entropy table is for it)."""
    combos = []
    for (label, rule), st in runs[runs["teacher_stage"].notna()].groupby(["label", "rule"], sort=False):
        own = (_canonical(rule), str(st["_knobs"].iloc[0]))
        teach = runs[runs["model_stage"].isin(set(st["teacher_stage"])) & runs["rule"].notna()]
        budgets = teach.groupby(["rule", "_knobs"])["steps"].nunique()
        settings = {s for s in zip(teach["rule"], teach["_knobs"]) if budgets.get(s, 0) >= 2}
        for t_rule, t_knobs in sorted(settings, key=lambda s: ((_canonical(s[0]), s[1]) != own, s)):
            combos.append((label, rule, st, t_rule, t_knobs))
    return combos


def speedup_frame(study: Study, n_boot: int = N_BOOT) -> pd.DataFrame:
    """One row per (student label, rule, k, teacher rule, metric): the teacher label (with its rule), the student's
    mean value, N* with its status and 95% interval, the NFE and wall-clock speed-ups, the units and the teacher
    budgets. The teacher is compared under every rule it was sampled with, the student's own first."""
    runs = _units(study)
    if runs.empty or runs["teacher_stage"].isna().all():
        return pd.DataFrame()
    wall = SAMPLING_WALL_S if SAMPLING_WALL_S in runs else None
    rows = []
    runs["_knobs"] = runs["knobs"].fillna("").astype(str) if "knobs" in runs else ""
    combos = _combos(runs)
    for label, rule, st, t_rule, t_knobs in combos:
        teach = runs[
            runs["model_stage"].isin(set(st["teacher_stage"])) & (runs["rule"] == t_rule) & (runs["_knobs"] == t_knobs)
        ]
        t_label = " / ".join(dict.fromkeys(teach.sort_values("steps")["label"])) + f" ({t_rule})"
        pairs = [(s, t) for s, t in st[["model_stage", "teacher_stage"]].drop_duplicates().itertuples(index=False)]
        for metric in speedup_metrics(study):
            to_z, from_z = _score_fn(metric)

            def per_budget(r: pd.DataFrame, col: str, f=lambda x: x) -> dict:
                v = pd.to_numeric(r[col], errors="coerce")
                ok = v.notna() & r["steps"].notna()
                return {int(n): float(np.mean(f(g.to_numpy(float)))) for n, g in v[ok].groupby(r["steps"][ok])}

            for k in sorted(int(x) for x in st["steps"].dropna().unique()):
                t_curves, s_vals, t_wall, s_wall = [], [], [], []
                for s_id, t_id in pairs:
                    sk = st[(st["model_stage"] == s_id) & (st["steps"] == k)]
                    tc = per_budget(teach[teach["model_stage"] == t_id], metric, to_z)
                    if sk.empty or not tc or pd.to_numeric(sk[metric], errors="coerce").isna().all():
                        continue
                    t_curves.append(tc)
                    s_vals.append(float(np.nanmean(to_z(pd.to_numeric(sk[metric], errors="coerce").to_numpy(float)))))
                    if wall:
                        t_wall.append(per_budget(teach[teach["model_stage"] == t_id], wall))
                        s_wall.append(float(pd.to_numeric(sk[wall], errors="coerce").mean()))
                if not t_curves:
                    continue
                tw = {
                    n: float(np.nanmean([w.get(n, math.nan) for w in t_wall])) for n in {n for w in t_wall for n in w}
                }
                mb = matched_budget(
                    t_curves,
                    s_vals,
                    k,
                    teacher_wall=tw or None,
                    student_wall=float(np.nanmean(s_wall)) if s_wall else None,
                    n_boot=n_boot,
                )
                rows.append(
                    {
                        "student": label,
                        "rule": rule,
                        "k": k,
                        "teacher": t_label,
                        "metric": metric,
                        "student_value": from_z(mb.student_z),
                        "n_star": mb.n_star,
                        "status": mb.status,
                        "n_star_ci_low": mb.ci[0],
                        "n_star_ci_high": mb.ci[1],
                        "speedup_nfe": mb.speedup_nfe,
                        "speedup_nfe_ci_low": mb.speedup_nfe_ci[0],
                        "speedup_nfe_ci_high": mb.speedup_nfe_ci[1],
                        "speedup_wall": mb.speedup_wall,
                        "units": mb.n_units,
                        "teacher_budgets": ",".join(map(str, mb.budgets)),
                    }
                )
    return pd.DataFrame(rows)


def _bound(x: float, budgets: Sequence[int], scale: float = 1.0) -> str:
    if x == -math.inf:
        return f"≤ {budgets[0] / scale:.3g}"
    if x == math.inf:
        return f"> {budgets[-1] / scale:.3g}"
    return DASH if not math.isfinite(x) else f"{x:.3g}"


def speedup_table(study: Study, n_boot: int = N_BOOT) -> Table:
    """`speedup_frame` as the report's table_speedup (numbers in `Table.numbers`)."""
    df = speedup_frame(study, n_boot=n_boot)
    cols = (
        "student",
        "rule",
        "k",
        "teacher",
        "metric",
        "student value",
        "N* [95% CI]",
        "N*/k (NFE) [95% CI]",
        "wall-clock speed-up",
        "units",
    )
    cells = []
    for r in df.itertuples(index=False):
        budgets = [int(b) for b in r.teacher_budgets.split(",")]
        if r.status == IN_RANGE:
            n_star = f"{r.n_star:.3g}"
            speed = f"{r.speedup_nfe:.3g}"
        elif r.status == BELOW:
            n_star = f"≤ {budgets[0]} (no N* in range: the teacher's fewest steps are as good)"
            speed = f"≤ {budgets[0] / r.k:.3g}"
        else:
            n_star = f"> {budgets[-1]} (no N* in range: the student beats every teacher budget)"
            speed = f"> {budgets[-1] / r.k:.3g}"
        if r.units > 1:
            n_star += f" [{_bound(r.n_star_ci_low, budgets)}, {_bound(r.n_star_ci_high, budgets)}]"
            speed += f" [{_bound(r.speedup_nfe_ci_low, budgets, r.k)}, {_bound(r.speedup_nfe_ci_high, budgets, r.k)}]"
        wall = DASH if not math.isfinite(r.speedup_wall) else f"{r.speedup_wall:.3g}×"
        cells.append(
            (
                r.student,
                r.rule,
                str(r.k),
                r.teacher,
                r.metric,
                f"{r.student_value:.4g}",
                n_star,
                speed,
                wall,
                str(r.units),
            )
        )
    notes = (
        "N*: the teacher budget whose quality equals the student's at k steps, the teacher's mean curve "
        "interpolated linearly in log2 N (perplexities as log ppl, i.e. NLL per token), first crossing "
        "(fsdfm.report.speedup); 95% CI: percentile bootstrap over training units (student with its own teacher)",
        "N*/k: the speed-up at equal quality in NFE; wall-clock: the teacher's measured sampling time at N* "
        "(log-log interpolation) over the student's at k",
        "no N* in range: '≤ N_1' when the teacher at its fewest steps already matches the student, "
        "'> N_m' when the student beats the teacher at its largest budget; only a bound on the speed-up then",
    )
    return Table(
        name="table_speedup",
        title=f"{study.name}: quality-matched speed-up (teacher budget N* matching the student)",
        columns=cols,
        cells=tuple(cells),
        bold=tuple((False,) * len(cols) for _ in cells),
        sections=(),
        notes=notes,
        numbers=df,
        n_label_columns=5,
    )
