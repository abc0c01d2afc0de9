"""One table across studies (`fsdfm compare A B ...`, `fsdfm.compare(...)`): the W&B "compare runs" habit with the
suite's significance rules.

Each study contributes its runs (the data row, models; not per-position divergence) with a `study` column; the
table has one row per (method label, rule, steps, study), the rows of one setting side by side, and is built by
`fsdfm.report.metric_table.metric_table`, so a best mark means what it means in a study's own report: significant
against the runner-up by Welch's t-test across seeds (else across per-sample values), data rows excluded,
entropy/diversity ranked by distance to the data row (the first study's, named in the notes when the studies'
data rows differ). Runs of two studies are independent: no pairing is ever assumed across studies.

A study is named by its results folder (holding plan.json), its spec file (then `<results>/<name>`), or a
results.json that `fsdfm report` wrote (`fsdfm.report.results_json`; no per-sample values then, so a single-seed
setting is not tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from fsdfm.report.metric_table import metric_table
from fsdfm.report.summary import DATA_KIND, DIAGNOSTIC_KINDS, load_study
from fsdfm.report.table import MAUVE_MIN_N, Table
from fsdfm.report.tables import main_metrics
from fsdfm.study.yaml_io import SpecError, check_name, read_yaml
from fsdfm.report.results_json import check_version

STUDY_COLUMN = "study"
COMPARE_BY = ("label", "rule", "steps", STUDY_COLUMN)


class CompareError(ValueError):
    """A study named to compare cannot be read (what and where in the message)."""


@dataclass(frozen=True)
class StudyRuns:
    """What `compare` needs of one study: its name, its run table, its per-sample table (or None) and its
    report's MAUVE sample floor."""

    name: str
    runs: pd.DataFrame
    samples: pd.DataFrame | None = None
    mauve_min_n: int = MAUVE_MIN_N


@dataclass(frozen=True)
class StudyComparison:
    """`table`: the rendered comparison (`Table`: to_markdown, to_latex, to_csv); `frame`: its numbers, one row per
    table row (`<metric>_mean`, `_std`, `_ci95`, `_n`, and the label columns); `studies`: the names compared."""

    table: Table
    frame: pd.DataFrame
    studies: tuple


def read_study(source: str | os.PathLike, results: str | os.PathLike = "results") -> StudyRuns:
    """A study folder, a spec file (its study under `results`) or a results.json -> StudyRuns (CompareError if none)."""
    p = Path(source)
    if p.is_file() and p.suffix == ".json":
        return _from_results_json(p)
    if p.is_file():
        try:
            p = Path(results) / check_name(read_yaml(p).get("name"), "name", str(p))
        except (SpecError, OSError) as e:
            raise CompareError(f"{source}: not a study spec ({e})") from None
    if not (p / "plan.json").is_file():
        raise CompareError(
            f"{source}: no study here ({p / 'plan.json'} missing); name a results folder, a spec whose study has "
            "run, or a results.json"
        )
    study = load_study(p)
    return StudyRuns(study.name, study.runs, study.samples, int(study.report_settings["mauve_min_n"]))


def _from_results_json(path: Path) -> StudyRuns:
    import json

    try:
        doc = json.loads(path.read_text())
        check_version(doc, str(path))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CompareError(f"{path}: {e}") from None
    rows = [
        {
            "run_id": r["run_id"],
            "label": r["label"],
            "rule": r["rule"],
            "steps": r["steps"],
            "kind": r["kind"],
            **r["seeds"],
            **{m: (float("nan") if v is None else v) for m, v in r["metrics"].items()},
        }
        for r in doc["runs"]
    ]
    runs = pd.DataFrame(rows)
    if "steps" in runs:
        runs["steps"] = pd.to_numeric(runs["steps"], errors="coerce").astype("Int64")
    return StudyRuns(doc["study"], runs)


def compare_runs(studies: Sequence[StudyRuns], metrics: Sequence[str] | None = None) -> StudyComparison:
    """The comparison table of `studies` (module docstring); `metrics` default: the main table's."""
    names = [s.name for s in studies]
    if len(studies) < 2:
        raise CompareError(f"compare needs at least two studies, got {len(studies)}: {', '.join(names) or '-'}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CompareError(f"study {dup[0]!r} named twice; compare distinct studies")
    frames, samples = [], []
    for s in studies:
        runs = s.runs[~s.runs["kind"].isin(DIAGNOSTIC_KINDS)] if "kind" in s.runs else s.runs
        # run ids are unique within a study only: prefix them so per-sample rows join to their own study's runs
        runs = runs.assign(**{STUDY_COLUMN: s.name, "run_id": s.name + "/" + runs["run_id"].astype(str)})
        frames.append(runs)
        if s.samples is not None and len(s.samples) and "run_id" in s.samples:
            samples.append(s.samples.assign(run_id=s.name + "/" + s.samples["run_id"].astype(str)))
    runs = pd.concat(frames, ignore_index=True)
    notes = [f"studies compared: {', '.join(names)}; rows of one setting side by side, one row per study"]
    if "kind" in runs:
        data = runs[runs["kind"] == DATA_KIND]
        data_studies = list(dict.fromkeys(data[STUDY_COLUMN]))
        wanted = [m for m in (metrics or main_metrics()) if m in data]
        differs = [m for m in wanted if data.groupby(STUDY_COLUMN)[m].mean().nunique() > 1]
        if len(data_studies) > 1 and differs:
            notes.append(
                f"the studies' data rows differ ({', '.join(differs)}): distances to the data row and collapse flags "
                f"use study {data_studies[0]!r}'s"
            )
    table = metric_table(
        runs,
        list(metrics or main_metrics()),
        name="table_compare",
        title=f"compare: {' vs '.join(names)}",
        by=COMPARE_BY,
        extra_notes=notes,
        samples=pd.concat(samples, ignore_index=True) if samples else None,
        mauve_min_n=min(s.mauve_min_n for s in studies),
    )
    return StudyComparison(table, table.numbers, tuple(names))


def compare(
    *studies: str | os.PathLike, results: str | os.PathLike = "results", metrics: Sequence[str] | None = None
) -> StudyComparison:
    """`fsdfm.compare("results/a", "experiments/b.yaml", "c/report/results.json")`: one table across studies."""
    return compare_runs([read_study(s, results) for s in studies], metrics)
