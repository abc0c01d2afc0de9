"""One results file per study, `report/results.json`, as lm-evaluation-harness writes one per run: every setting's
statistics, every run's metrics, every table of the report and where its figures are, in one versioned document.

The format is `RESULTS_SCHEMA` (JSON Schema, draft 2020-12), documented in the README ("Results JSON"):

    {"schema": "fsdfm-results", "schema_version": 1, "study", "description", "generated" (UTC, ISO 8601),
     "code": {"commits", "dirty"}, "runs_finished", "runs_planned",
     "settings": [{"label", "rule", "steps", "kind", "metrics": {name: {"mean", "std", "ci95", "n", "min", "max"}}}],
     "runs":     [{"run_id", "stage_id", "label", "rule", "steps", "kind", "seeds": {key: value}, "metrics": {name: x}}],
     "tables":   [{"name", "title", "columns", "rows", "bold", "notes"}],
     "figures":  [{"name", "title", "caption", "files"}], "skipped_figures": [{"name", "reason"}]}

std and ci95 are the sample std (ddof 1) and the 95% Student-t half-width across seeds (null for one seed); a
number that is not finite is null. A reader checks `schema_version` and refuses one it does not know; a change
that removes or renames a field bumps it (adding an optional field does not).

`python -m fsdfm.report.results_json` prints the schema.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Sequence

import pandas as pd

from fsdfm.report.plotting import FigureResult
from fsdfm.report.summary import Study, metric_columns, summarize
from fsdfm.report.table import Table

SCHEMA_NAME = "fsdfm-results"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}
_STEPS = {"type": ["integer", "null"]}
_STATS = {
    "type": "object",
    "required": ["mean", "std", "ci95", "n", "min", "max"],
    "properties": {
        "mean": {"type": "number"},
        "std": _NUM,
        "ci95": _NUM,
        "n": {"type": "integer", "minimum": 1},
        "min": {"type": "number"},
        "max": {"type": "number"},
    },
    "additionalProperties": False,
}
_SETTING_KEYS = {"label": {"type": "string"}, "rule": _STR, "steps": _STEPS, "kind": _STR}
RESULTS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://fsdfm/schemas/{SCHEMA_NAME}-{SCHEMA_VERSION}.json",
    "title": "fsdfm study results",
    "type": "object",
    "required": [
        "schema",
        "schema_version",
        "study",
        "generated",
        "code",
        "runs_finished",
        "runs_planned",
        "settings",
        "runs",
        "tables",
        "figures",
    ],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "study": {"type": "string"},
        "description": {"type": "string"},
        "generated": {"type": "string", "format": "date-time"},
        "code": {
            "type": "object",
            "required": ["commits", "dirty"],
            "properties": {
                "commits": {"type": "array", "items": {"type": "string"}},
                "dirty": {"type": ["boolean", "null"]},
            },
        },
        "runs_finished": {"type": "integer", "minimum": 0},
        "runs_planned": {"type": "integer", "minimum": 0},
        "settings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["label", "rule", "steps", "kind", "metrics"],
                "properties": {**_SETTING_KEYS, "metrics": {"type": "object", "additionalProperties": _STATS}},
            },
        },
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["run_id", "stage_id", "label", "rule", "steps", "kind", "seeds", "metrics"],
                "properties": {
                    "run_id": {"type": "string"},
                    "stage_id": {"type": "string"},
                    **_SETTING_KEYS,
                    "seeds": {"type": "object"},
                    "metrics": {"type": "object", "additionalProperties": _NUM},
                },
            },
        },
        "tables": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "columns", "rows", "bold", "notes"],
                "properties": {
                    "name": {"type": "string"},
                    "title": {"type": "string"},
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    "bold": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}},
                    "notes": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "caption", "files"],
                "properties": {
                    "name": {"type": "string"},
                    "title": {"type": "string"},
                    "caption": {"type": "string"},
                    "files": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "skipped_figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "reason"],
                "properties": {"name": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
    },
}


def _value(x: Any) -> Any:
    """A JSON value: numpy/pandas scalars as Python ones, NaN/inf/NA as null."""
    if x is None or x is pd.NA:
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)):
        return x
    try:
        return None if pd.isna(x) else str(x)
    except (TypeError, ValueError):
        return str(x)


def _steps(x: Any) -> int | None:
    v = _value(x)
    return None if v is None else int(v)


def results_document(
    study: Study,
    tables: Sequence[Table] = (),
    figures: Sequence[FigureResult] = (),
    generated: str | None = None,
) -> dict:
    """The results document of `study` (module docstring) with the report's `tables` and `figures` (file names
    relative to the report folder)."""
    runs = study.runs
    metrics = metric_columns(runs) if len(runs) else []
    by = [c for c in ("label", "rule", "steps", "kind") if c in runs] if len(runs) else []
    settings: list[dict] = []
    if len(runs) and metrics:
        summary = summarize(runs, by, metrics)
        for key, g in summary.groupby(by, dropna=False, sort=False):
            key = dict(zip(by, key if isinstance(key, tuple) else (key,)))
            settings.append(
                {
                    "label": str(key.get("label")),
                    "rule": _value(key.get("rule")),
                    "steps": _steps(key.get("steps")),
                    "kind": _value(key.get("kind")),
                    "metrics": {
                        r["metric"]: {s: _value(r[s]) for s in ("mean", "std", "ci95", "n", "min", "max")}
                        for _, r in g.iterrows()
                    },
                }
            )
    run_rows = []
    for _, r in runs.iterrows():
        run_rows.append(
            {
                "run_id": str(r.get("run_id")),
                "stage_id": str(r.get("stage_id")),
                "label": str(r.get("label")),
                "rule": _value(r.get("rule")),
                "steps": _steps(r.get("steps")),
                "kind": _value(r.get("kind")),
                "seeds": {k: _value(r.get(k)) for k in study.seed_keys if k in r},
                "metrics": {m: _value(pd.to_numeric(r.get(m), errors="coerce")) for m in metrics},
            }
        )
    commits = sorted({str(c) for c in runs.get("commit", []) if isinstance(c, str)})
    dirty_values = [bool(d) for d in runs.get("dirty", []) if d is not None and d == d]
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "study": study.name,
        "description": study.description,
        "generated": generated or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": {"commits": commits, "dirty": any(dirty_values) if dirty_values else None},
        "runs_finished": int(len(runs)),
        "runs_planned": int(study.n_planned),
        "settings": settings,
        "runs": run_rows,
        "tables": [
            {
                "name": t.name,
                "title": t.title,
                "columns": [str(c) for c in t.columns],
                "rows": [[str(c) for c in row] for row in t.cells],
                "bold": [[bool(b) for b in row] for row in t.bold],
                "notes": [str(n) for n in t.notes],
            }
            for t in tables
        ],
        "figures": [
            {"name": f.name, "title": f.title, "caption": f.caption, "files": [p.name for p in f.paths]}
            for f in figures
            if f.skipped is None
        ],
        "skipped_figures": [{"name": f.name, "reason": str(f.skipped)} for f in figures if f.skipped is not None],
    }


def check_version(doc: dict, where: str) -> None:
    """Refuse a results document of another schema or an unknown version (ValueError naming `where`)."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise ValueError(f'{where}: not an fsdfm results file (no "schema": {SCHEMA_NAME!r})')
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{where}: results schema_version {doc.get('schema_version')!r}; this fsdfm reads version {SCHEMA_VERSION}"
        )


if __name__ == "__main__":  # pragma: no cover - prints the schema
    print(json.dumps(RESULTS_SCHEMA, indent=2))
