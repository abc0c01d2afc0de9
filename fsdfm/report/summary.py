"""From `fsdfm.records.load` rows to per-setting statistics across seeds.

A *setting* is one (label, rule, steps) cell of a study; its *seeds* are the runs that share those keys
(training seeds, sampling seeds, ...). For each setting and metric, `summarize` gives

    mean = (1/n) sum_i x_i
    std  = sqrt(sum_i (x_i - mean)^2 / (n - 1))                  (NaN for n = 1)
    ci95 = t_{0.975, n-1} * std / sqrt(n)                        (Student t half-width; NaN for n = 1)

over the n runs that recorded the metric (NaN values do not count as seeds).

`load_study` reads one study directory into a `Study`: the run table with the derived columns the report
needs (`sampling_wall_s`, `n_samples`, variant labels for ablated grid keys) and what the plan says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from fsdfm.metrics.registry import METRICS, MetricInfo
from fsdfm.records import read_record, stage_dir
from fsdfm.io import read_json
from fsdfm.records import PLAN, load, load_samples

DEFAULT_BY = ("label", "rule", "steps")
DATA_KIND = "data"
DATA_LABEL = "data (held-out)"
EXTERNAL_RUN_KIND = "external"  # the `kind` of a run scored by `fsdfm eval` (fsdfm.external's RunSpec params)
POS_KIND = "pos_divergence"
LAW_KIND = "exact_law"  # the runs of fsdfm.methods.exact_law: a sampler's exact output law, not samples
SPLIT_KIND = "path_split"  # the runs of fsdfm.methods.path_split: a sampler's trajectory KL split, not samples
DIAGNOSTIC_KINDS = (
    POS_KIND,
    LAW_KIND,
    SPLIT_KIND,
)  # runs of a diagnostic stage: never rows of the sample-quality tables
SANITY = "sanity"  # the run parameter of a model-free sanity row (fsdfm.methods.base.MethodKind.sanity)
SAMPLING_WALL_S = "sampling_wall_s"  # derived column: see `sampling_wall_s`
# run-parameter columns every run has (the rest of a run's parameters are grid keys)
RUN_KEYS = ("kind", "method", "label", "rule", "steps")
SUMMARY_COLUMNS = ("metric", "mean", "std", "ci95", "n", "min", "max", "n_samples")


# ------------------------------------------------------------------------------------------------ columns
def sampling_wall_s_column(df: pd.DataFrame) -> str | None:
    """Which column of a `load()` table holds the sampling wall-clock (the one place that knows).

    `load()` names a payload metric that collides with a provenance column `metrics.<name>`: while the stage's
    own run time is the provenance column `wall_s`, the sampler's time is `metrics.wall_s`; once provenance
    is renamed `stage_wall_s`, the sampler's time is plain `wall_s`. None where neither exists.
    """
    for col in ("metrics.wall_s", "wall_s"):
        if col in df.columns:
            return col
    return None


def sampling_wall_s(df: pd.DataFrame) -> pd.Series:
    """Sampling wall-clock seconds of each run, from `sampling_wall_s_column` (NaN where there is none)."""
    col = sampling_wall_s_column(df)
    if col is None:
        return pd.Series(np.nan, index=df.index, name=SAMPLING_WALL_S, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").rename(SAMPLING_WALL_S)


def metric_info(name: str) -> MetricInfo:
    """Direction/unit of a metric column: the registry entry, `wall_s`'s for `sampling_wall_s` and for
    `metrics.<name>`, or a direction-less placeholder for a column the registry does not know."""
    key = "wall_s" if name == SAMPLING_WALL_S else name.removeprefix("metrics.")
    if key in METRICS:
        return METRICS.get(key)
    return MetricInfo(name, None, "", "other", "not in fsdfm.metrics.registry.METRICS")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns of a run table: registered metric names and `sampling_wall_s`, in registry order.

    The plain `wall_s` column is left out: it may be the stage's run time (see `sampling_wall_s`)."""
    names = [n for n in METRICS.names() if n != "wall_s"] + [SAMPLING_WALL_S]
    return [n for n in names if n in df.columns and pd.to_numeric(df[n], errors="coerce").notna().any()]


def present(df: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The metrics of `metrics` that `df` has a number for (a study need not record every metric)."""
    return [m for m in metrics if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()]


def is_seed_key(key: str) -> bool:
    """A grid key that only re-draws randomness: `seed`, `*.seed` or `*_seed` (training or sampling)."""
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


# ---------------------------------------------------------------------------------------------- summarize
def _t_half_width(std: float, n: int, level: float) -> float:
    if n < 2 or not math.isfinite(std):
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def summarize(
    df: pd.DataFrame, by: Sequence[str] = DEFAULT_BY, metrics: Sequence[str] | None = None, level: float = 0.95
) -> pd.DataFrame:
    """Mean, std, CI half-width and n across the seeds of each setting, one row per (setting, metric).

    df:      a run table (`fsdfm.records.load`, or `Study.runs`), one row per run.
    by:      the columns that define a setting; runs sharing them are seeds. Missing values (the data row's
             rule and steps) form their own group; groups keep their order of first appearance.
    metrics: the metric columns (default: every recorded metric, `metric_columns`); names `df` has no number
             for are skipped, so a study that did not record a metric simply has no rows for it.
    Returns columns [*by, "metric", "mean", "std", "ci95", "n", "min", "max", "n_samples"] where n counts the
    runs with a value, ci95 is the `level` Student-t half-width (see the module docstring) and n_samples is the number
    of samples per run (the smallest in the group; NaN when the table has no `n_samples` column).
    """
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: grouping column(s) {missing} not in the run table; columns: {list(df.columns)}")
    if not 0 < level < 1:
        raise ValueError(f"summarize: level must be in (0, 1), got {level!r}")
    metrics = metric_columns(df) if metrics is None else present(df, metrics)
    rows = []
    if len(df):
        for keys, g in df.groupby(by, dropna=False, sort=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            n_samples = pd.to_numeric(g["n_samples"], errors="coerce").min() if "n_samples" in g else math.nan
            for m in metrics:
                x = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(dtype=float)
                n = len(x)
                if n == 0:
                    continue
                mean = float(x.mean())
                std = float(x.std(ddof=1)) if n > 1 else math.nan
                rows.append(
                    {
                        **dict(zip(by, keys)),
                        "metric": m,
                        "mean": mean,
                        "std": std,
                        "ci95": _t_half_width(std, n, level),
                        "n": n,
                        "min": float(x.min()),
                        "max": float(x.max()),
                        "n_samples": n_samples,
                    }
                )
    out = pd.DataFrame(rows, columns=by + list(SUMMARY_COLUMNS))
    out["n"] = out["n"].astype("int64")
    if "steps" in out:
        out["steps"] = out["steps"].astype("Int64")
    return out


def wide(
    summary: pd.DataFrame,
    by: Sequence[str] = DEFAULT_BY,
    stats: Sequence[str] = ("mean", "std", "ci95", "n"),
) -> pd.DataFrame:
    """`summarize` output pivoted to one row per setting with `<metric>_<stat>` columns (order preserved)."""
    by = list(by)
    settings = summary[by].drop_duplicates()
    out = settings.reset_index(drop=True)
    for m in dict.fromkeys(summary["metric"]):
        part = summary[summary["metric"] == m]
        part = part[by + list(stats)].rename(columns={s: f"{m}_{s}" for s in stats})
        out = out.merge(part, on=by, how="left")
    return out


# ------------------------------------------------------------------------------------------------- studies
@dataclass(frozen=True)
class Study:
    """One study directory, read for reporting.

    runs: one row per finished run (`fsdfm.records.load`) plus `sampling_wall_s`, `n_samples` (from the final
          record's payload) and `label` rewritten to name the ablated grid values ("FS-DFM (shortcut=heun)").
    grid_keys / seed_keys / ablation_keys: the study's grid parameters, those that only re-seed, and the others
          (varied with more than one value; they distinguish settings, so they go into the label).
    wall_s_source: the `load()` column the sampling wall-clock came from (see `sampling_wall_s_column`).
    """

    name: str
    path: Path
    plan: dict
    runs: pd.DataFrame
    description: str
    grid_keys: tuple
    seed_keys: tuple
    ablation_keys: tuple
    n_planned: int
    wall_s_source: str | None = None  # the `load()` column `sampling_wall_s` was read from
    samples: pd.DataFrame | None = None  # `fsdfm.records.load_samples`: one row per sample of every evaluated run
    notes: tuple = ()  # what reading the study had to say (e.g. runs without a per-sample table)

    @property
    def report_settings(self) -> dict:
        """The spec's report section as planned (fsdfm.study.spec.ReportSpec): mauve_min_n, pairs."""
        return {"mauve_min_n": 256, "pairs": [], **(self.plan.get("report") or {})}

    @property
    def asked_metrics(self) -> frozenset | None:
        """The metrics the spec asked for: every scoring stage's `metrics.names`, with gen_ppl_second where a
        second evaluator scored gen_ppl; None where the plan names none. A table names only these as "not
        recorded": a metric the spec never asked for (an oracle metric in a text study) is not news."""
        names: set = set()
        for st in (self.plan.get("stages") or {}).values():
            asked = ((st.get("config") or {}).get("metrics") or {}).get("names")
            if isinstance(asked, list):
                names.update(asked)
                if "gen_ppl" in asked and "evaluator_second" in (st.get("inputs") or {}):
                    names.add("gen_ppl_second")
        return frozenset(names) or None

    @property
    def data(self) -> pd.DataFrame:
        return self.runs[self.runs["kind"] == DATA_KIND] if "kind" in self.runs else self.runs.iloc[:0]

    @property
    def models(self) -> pd.DataFrame:
        """Runs of models (not the data reference, not a diagnostic: per-position divergence, exact law)."""
        if "kind" not in self.runs:
            return self.runs
        return self.runs[~self.runs["kind"].isin([DATA_KIND, *DIAGNOSTIC_KINDS])]

    @property
    def divergence(self) -> pd.DataFrame:
        return self.runs[self.runs["kind"] == POS_KIND] if "kind" in self.runs else self.runs.iloc[:0]


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix that tells each key apart ("methods.fsdfm.distill.shortcut" -> "shortcut")."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[-i:])
            if sum(1 for o in keys if o == cand or o.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def grid_value(v) -> str:
    """A grid value as the spec wrote it: a column holding None beside numbers turns ints into floats (300 ->
    300.0), which a label should not show."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def variant_labels(df: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """`label` extended with the values of the ablated grid `keys` a run depends on (None: does not)."""
    keys = [k for k in keys if k in df.columns]
    if not keys or "label" not in df:
        return df["label"] if "label" in df else pd.Series(dtype=object)
    short = _short_names(keys)

    def one(row) -> str:
        parts = [f"{short[k]}={grid_value(row[k])}" for k in keys if row[k] is not None and not pd.isna(row[k])]
        return f"{row['label']} ({', '.join(parts)})" if parts else row["label"]

    return df.apply(one, axis=1)


def n_samples_by_stage(study_dir: Path, stage_ids: Sequence[str]) -> dict[str, float]:
    """Samples per run from each final record's payload `n_samples` (`load()` keeps only payload metrics)."""

    out = {}
    for sid in dict.fromkeys(stage_ids):
        rec = read_record(stage_dir(study_dir, sid), warn=False) or {}
        n = (rec.get("payload") or {}).get("n_samples")
        out[sid] = float(n) if isinstance(n, (int, float)) else math.nan
    return out


def load_study(study_dir: str | Path) -> Study:
    """Read `study_dir` (holding plan.json) into a `Study`; a clear error when it is not a study directory."""
    import warnings

    path = Path(study_dir)
    if not (path / PLAN).is_file():
        raise FileNotFoundError(f"{path}: no {PLAN} here; pass a study directory (results/<study>)")
    plan = read_json(path / PLAN)
    df = load(path).copy()
    grid = [k for k in dict.fromkeys(k for r in plan.get("runs", []) for k in r.get("params", {})) if k not in RUN_KEYS]
    seeds = [k for k in grid if is_seed_key(k)]
    # values compared as text: a grid value may be a list (unhashable)
    ablated = [k for k in grid if k not in seeds and k in df.columns and df[k].dropna().astype(str).nunique() > 1]
    wall_col = sampling_wall_s_column(df)
    df[SAMPLING_WALL_S] = sampling_wall_s(df)
    if "n_samples" not in df.columns:
        ns = n_samples_by_stage(path, list(df["stage_id"]))
        df["n_samples"] = [ns[s] for s in df["stage_id"]]
    if ablated:
        df["base_label"] = df["label"]
        df["label"] = variant_labels(df, ablated)
    if "steps" in df.columns:
        df["steps"] = pd.to_numeric(df["steps"], errors="coerce").astype("Int64")
    with warnings.catch_warnings(record=True) as caught:  # said in the report, not on stderr
        warnings.simplefilter("always")
        samples = load_samples(path)
    return Study(
        name=plan.get("name", path.name),
        path=path,
        plan=plan,
        runs=df,
        description=str(plan.get("description") or "").strip(),
        grid_keys=tuple(grid),
        seed_keys=tuple(seeds),
        ablation_keys=tuple(ablated),
        n_planned=sum((r.get("params") or {}).get("kind") != EXTERNAL_RUN_KIND for r in plan.get("runs", [])),
        wall_s_source=wall_col,
        samples=samples,
        notes=tuple(str(w.message) for w in caught),
    )
