"""`fsdfm compare STUDY_OR_SPEC...`: one table across studies by setting (`fsdfm.report.compare`), printed as Markdown;
`--out DIR` also writes it as table_compare.{md,tex,csv}."""

from __future__ import annotations

from pathlib import Path

from fsdfm.cli.common import InputError, UsageError, require_extra


def cmd_compare(args) -> dict:
    require_extra("report")
    from fsdfm.report import write_table  # heavy: pandas, matplotlib (checked by require_extra first)
    from fsdfm.metrics.registry import METRICS  # heavy: numpy/torch, loaded only after main() set the threads
    from fsdfm.report.compare import CompareError, compare  # heavy: pandas (as above)

    metrics = [m.strip() for m in (args.metrics or "").split(",") if m.strip()] or None
    for m in metrics or ():
        METRICS.get(m)  # an unknown name: one line with "did you mean" (UnknownNameError -> exit 2)
    if len(args.studies) < 2:
        raise UsageError(f"fsdfm compare needs at least two studies, got {len(args.studies)}")
    try:
        result = compare(*args.studies, results=args.results, metrics=metrics)
    except CompareError as e:
        raise InputError(str(e)) from None
    print(f"# {result.table.title}\n")
    print(result.table.to_markdown())
    written = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = [str(p) for p in write_table(result.table, out)]
        print(f"written: {', '.join(written)}")
    return {"studies": list(result.studies), "rows": len(result.table.cells), "files": written}
