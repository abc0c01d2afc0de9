"""`fsdfm report`, `fsdfm samples` and `fsdfm eval`: read a finished study (tables, figures, decoded samples) and
score external samples with its metrics."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from pathlib import Path

from fsdfm.cli.common import DEFAULT_ROOT, InputError, _read_plan, require_extra
from fsdfm.cli.spec import study_dir
from fsdfm.records import read_record


def cmd_report(args) -> dict:
    sdir = study_dir(args)
    _read_plan(sdir)
    require_extra("report")
    from fsdfm.report import write_report  # heavy: pandas, matplotlib (checked by require_extra first)

    try:
        out = write_report(sdir, Path(args.out) if args.out else sdir / "report")
    except ModuleNotFoundError as e:  # a module of an extra imported deep inside (the list above missed it)
        raise InputError(
            f"fsdfm report needs the 'analysis' extra (module {e.name!r} is not installed): "
            "pip install 'fsdfm[analysis]'"
        ) from None
    print(f"report: {out.index}  (one file: {out.html}; results: {out.results})")
    result = {
        "study": sdir.name,
        "report": str(out.index),
        "tables": [str(p) for p in out.tables],
        "figures": [str(p) for p in out.figures],
        "html": str(out.html),
        "results": str(out.results),
    }
    if getattr(args, "records", False):
        from fsdfm.report.light_records import copy_light_records  # heavy: the report package (pandas)

        light = copy_light_records(sdir, out.index.parent)
        print(f"records: {light.folder} ({len(light.files)} files; {len(light.skipped)} too large, left out)")
        result["records"] = str(light.folder)
        result["records_skipped"] = [f"{p} ({why})" for p, why in light.skipped]
    return result


def cmd_samples(args) -> dict:
    """Print the first decoded samples of every evaluated run (method, rule, step budget)."""
    sdir = study_dir(args)
    plan = _read_plan(sdir)
    shown = 0
    for run in plan["runs"]:
        rec = read_record(sdir / "stages" / run["stage_id"], warn=False)
        if rec is None or "samples" not in rec.get("inputs", {}):
            continue
        texts = sdir / "stages" / rec["inputs"]["samples"] / "samples.jsonl"
        if not texts.exists():
            continue
        p = run["params"]
        print(f"=== {p.get('label') or p['method']} | rule {p.get('rule')} | {p.get('steps')} steps ===")
        for line in texts.read_text().splitlines()[: args.n]:
            text = " ".join(json.loads(line)["text"].split())
            print("  " + (text[: args.chars] + " ..." if len(text) > args.chars else text))
        shown += 1
    return {"study": sdir.name, "runs_shown": shown}


def _eval_study_dir(args) -> Path:
    """`fsdfm eval --spec X`: X is a spec file (its study under --results) or a study directory."""
    return study_dir(argparse.Namespace(target=args.spec, results=args.results, overrides=[], limit=None))


def cmd_eval(args) -> dict:
    """Score external sample files with a study's metrics and evaluator (fsdfm.external), recorded as runs."""
    from fsdfm.external import EvalLimits, ExternalError, eval_files  # heavy: torch (the metrics)

    sdir = _eval_study_dir(args)
    _read_plan(sdir)  # the study's plan must exist: its evaluate config and evaluator are what score the files
    try:
        given = {"max_file_bytes": args.max_file_bytes, "max_line_bytes": args.max_line_bytes}
        given["max_samples"] = args.max_samples
        limits = EvalLimits(**{k: v for k, v in given.items() if v is not None})
        done = eval_files(sdir, sdir.parent, args.files, args.label, limits)
    except ExternalError as e:
        raise InputError(str(e)) from None
    for r in done:
        for note in r.notes:
            print(f"warning: {note}", file=sys.stderr)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()) if isinstance(v, float))
        print(f"  {r.label:<24} {r.stage_id}  {shown}")
    where = "" if str(args.results) == str(DEFAULT_ROOT) else f" --results {shlex.quote(str(args.results))}"
    print(
        f"study {sdir.name}: scored {len(done)} external file(s)   next: fsdfm report {shlex.quote(args.spec)}{where}"
    )
    return {
        "study": sdir.name,
        "runs": [
            {
                "file": r.file,
                "label": r.label,
                "stage_id": r.stage_id,
                "run_id": r.run_id,
                "metrics": r.metrics,
                "notes": list(r.notes),
            }
            for r in done
        ],
    }
