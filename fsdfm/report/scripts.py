"""The shared command line of the analysis/ scripts: one study in, one table or figure out.

Every script takes a study directory (default results/demo under the repository root), writes its files to
--out (default <study>/report), prints the result for humans and ends with one JSON line:
{"study": ..., "files": [...], "skipped": ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

from fsdfm.report.summary import Study, load_study
from fsdfm.report import write_table
from fsdfm.report.figures import render

DEFAULT_STUDY = Path(__file__).resolve().parents[2] / "results" / "demo"


def _parse(doc: str, argv: Sequence[str] | None, published: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument(
        "study",
        nargs="?",
        default=str(DEFAULT_STUDY),
        help=f"a study results directory holding plan.json (default: {DEFAULT_STUDY})",
    )
    ap.add_argument("--out", default=None, help="output directory (default: <study>/report)")
    if published:
        ap.add_argument(
            "--published",
            nargs="*",
            default=[],
            metavar="KEY",
            help="published reference rows to append (keys of fsdfm.report.published.PUBLISHED)",
        )
    return ap.parse_args(argv)


def _finish(study: Study, files: list[Path], skipped: str | None = None) -> int:
    print(json.dumps({"study": study.name, "files": [str(p) for p in files], "skipped": skipped}))
    return 0


def table_script(
    doc: str,
    build: Callable[[Study, argparse.Namespace], list],
    argv: Sequence[str] | None = None,
    published: bool = False,
) -> int:
    """Build the tables `build(study, args)` returns, print each as Markdown, write md/tex/csv."""

    args = _parse(doc, argv, published)
    study = load_study(args.study)
    out = Path(args.out) if args.out else study.path / "report"
    tables = [t for t in build(study, args) if not t.empty]
    files: list[Path] = []
    for t in tables:
        print(f"## {t.title}\n\n{t.to_markdown()}")
        files += write_table(t, out)
    if not tables:
        print(f"{study.name}: nothing to tabulate")
    return _finish(study, files, None if tables else "no data for this table")


def figure_script(doc: str, name: str, argv: Sequence[str] | None = None) -> int:
    """Render figure kind `name` (a key of `fsdfm.report.figures.FIGURES`) as PNG and PDF."""

    args = _parse(doc, argv, published=False)
    study = load_study(args.study)
    out = Path(args.out) if args.out else study.path / "report"
    results = render(name, study, out)
    files = [p for r in results for p in r.paths]
    skipped = next((r.skipped for r in results if r.skipped), None)
    for r in results:
        print(
            f"{r.name}: skipped: {r.skipped}"
            if r.skipped
            else f"{r.title}: {', '.join(map(str, r.paths))}\n  {r.caption}"
        )
    return _finish(study, files, skipped)
