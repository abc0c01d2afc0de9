"""Reports of a study: tables (Markdown, LaTeX, CSV), figures (PNG, PDF), an index tying them together, the same
as one self-contained HTML file and a versioned results JSON.

    out = write_report("results/demo")             # -> results/demo/report/index.{md,html}, results.json, table_*.*, fig_*.*
    df = fsdfm.records.load("results/demo")
    summarize(df)                                  # mean, std, 95% CI half-width, n across seeds

Modules: `summary` (per-setting statistics, reading a study), `table` (the Table type and number formatting),
`tables` (the study's tables), `pairs` (headline pairs), `plotting` (figure helpers and types), `figures` (the
figure kinds), `significance` (marking the best), `oracle` (the oracle decomposition), `exact_samplers` (each
sampler's own error against the base sampler), `speedup` (quality-matched speed-up), `convergence` (training curves), `published` (published numbers for labelled reference rows),
`nfe_figure` (quality vs model calls), `evaluator_check` (gen-PPL's ranking against the exact oracle NLL), `html` (index.html), `results_json` (results.json and its schema), `compare`
(one table across studies). Scripts in analysis/ regenerate single tables/figures from these.

Which metrics a table or figure shows, its axis label and how it is ranked come from the metric's registry entry
(`fsdfm.metrics.registry`); the report knows nothing about how a metric is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fsdfm.report.entropy_frontier import entropy_frontier, matched_entropy_table
from fsdfm.report.exact_samplers import exact_samplers_table
from fsdfm.report.exact_law import exact_law_table
from fsdfm.report.facts import conventions, facts
from fsdfm.report.path_split import path_split_table
from fsdfm.report.evaluator_check import evaluator_agreement_table, evaluator_check_table
from fsdfm.report.figures import FIGURES, render
from fsdfm.report.html import HTML_FILE, html_report
from fsdfm.report.nfe_figure import quality_vs_nfe
from fsdfm.report.protocol import protocol_table
from fsdfm.report.oracle import decomposition_table
from fsdfm.report.oracle_figure import decomposition_figure
from fsdfm.report.convergence import convergence_figure, convergence_frame, convergence_table
from fsdfm.report.published import PUBLISHED
from fsdfm.report.summary import (
    DEFAULT_BY,
    LAW_KIND,
    SPLIT_KIND,
    Study,
    load_study,
    sampling_wall_s,
    summarize,
    wide,
)
from fsdfm.report.pairs import pairs_table
from fsdfm.report.speedup import speedup_table
from fsdfm.report.pair_grid import pair_grid_figure, pair_grid_table, pair_trend_table
from fsdfm.report.plotting import FigureResult
from fsdfm.report.results_json import RESULTS_FILE, results_document
from fsdfm.report.table import Table
from fsdfm.report.tables import (
    ablation_tables,
    cost_table,
    main_table,
    pos_divergence_table,
    sample_count_warnings,
    seeds_table,
    summary_csv,
)
from fsdfm.io import atomic_write

__all__ = [
    "write_report",
    "ReportOutput",
    "summarize",
    "wide",
    "load_study",
    "Study",
    "sampling_wall_s",
    "main_table",
    "cost_table",
    "pos_divergence_table",
    "seeds_table",
    "ablation_tables",
    "pairs_table",
    "speedup_table",
    "pair_grid_table",
    "pair_trend_table",
    "summary_csv",
    "sample_count_warnings",
    "Table",
    "write_table",
    "FIGURES",
    "render",
    "FigureResult",
    "PUBLISHED",
    "DEFAULT_BY",
    "decomposition_table",
    "decomposition_figure",
]

FIGURE_ORDER = ("step_sweep", "frontier", "quality_vs_nfe", "pos_divergence", "ablation")
FIGURES.register("quality_vs_nfe", quality_vs_nfe)
FIGURES.register("entropy_frontier", entropy_frontier)
KNOB_FIGURES = ("entropy_frontier",)  # drawn only for studies with sampler knobs (fsdfm.report.entropy_frontier)
FIGURES.register("decomposition", decomposition_figure)
FIGURES.register("convergence", convergence_figure)
ORACLE_FIGURES = ("decomposition",)  # drawn only for studies with an exact method (fsdfm.report.oracle)
FIGURES.register("pair_grid", pair_grid_figure)
GRID_FIGURES = ("pair_grid",)  # drawn only for studies with report.pairs across a grid (fsdfm.report.pair_grid)
CURVE_FIGURES = ("convergence",)  # drawn only for studies whose training records hold curves (optim.curve_every)


@dataclass(frozen=True)
class ReportOutput:
    """What `write_report` wrote: the index, the table files, the figure files, the figures it skipped
    as (name, reason) pairs, the self-contained HTML report and the results JSON."""

    index: Path
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    html: Path | None = None
    results: Path | None = None


# the tables shown in index.md under their own heading (in the candidates' order), each present only where the study
# has what it needs: an exact method (decomposition, exact_samplers), metrics.exact_law / path_split, a distilled
# student with its sampled teacher (speedup), an oracle study with a trained evaluator (evaluator_check)
SECTIONS = {
    "table_decomposition": "Few-step error decomposition (exact oracle)",
    "table_exact_law": "True divergences of each sampler's output law (exact)",
    "table_path_split": "Trajectory KL along the true path: factorization vs per-position",
    "table_exact_samplers": "Each sampler's own error (driven by the exact denoiser)",
    "table_speedup": "Quality-matched speed-up",
    "table_convergence": "Convergence (held-out curves along training)",
    "table_evaluator_check": "Evaluator check (gen-PPL against the exact oracle NLL)",
    "table_evaluator_agreement": "Evaluator check (gen-PPL under a second, larger evaluator)",
}


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Write <name>.md, <name>.tex and <name>.csv atomically; returns the three paths."""

    out = []
    for ext, text in (
        ("md", f"# {table.title}\n\n" + table.to_markdown()),
        ("tex", table.to_latex()),
        ("csv", table.to_csv()),
    ):
        path = Path(out_dir) / f"{table.name}.{ext}"
        atomic_write(path, text.encode("utf-8"))
        out.append(path)
    return out


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def _index(
    study: Study,
    main: Table | None,
    tables: list[tuple[Table, list[Path]]],
    figures: list[FigureResult],
    notes: list[str],
    out_dir: Path,
) -> str:
    parts = [f"# Report: {study.name}", ""]
    if study.description:
        parts += [study.description, ""]
    parts += [f"* {line}" for line in facts(study)] + [""]
    warnings = sample_count_warnings(study) if len(study.runs) else []
    if warnings or study.notes:
        parts += ["## Warnings", ""] + [f"* {w}" for w in warnings + list(study.notes)] + [""]
    if main is not None and not main.empty:
        parts += ["## Sample quality", "", main.to_markdown(), ""]
    else:
        parts += ["_No finished model runs yet: no quality table._", ""]
    pairs = next((t for t, _ in tables if t.name == "table_pairs"), None)
    if pairs is not None:
        parts += ["## Headline pairs", "", pairs.to_markdown(), ""]
    for t, _ in tables:
        if t.name in SECTIONS:
            parts += [f"## {SECTIONS[t.name]}", "", t.to_markdown(), ""]
    drawn = [f for f in figures if f.skipped is None]
    if drawn:
        parts += ["## Figures", ""]
        for f in drawn:
            png, pdf = f.paths
            parts += [
                f"### {f.title}",
                "",
                f"![{f.title}]({_rel(png, out_dir)})",
                "",
                f"{f.caption} ([PDF]({_rel(pdf, out_dir)}))",
                "",
            ]
    if tables:
        parts += ["## Tables", ""]
        for t, paths in tables:
            links = " · ".join(f"[{p.suffix[1:]}]({_rel(p, out_dir)})" for p in paths)
            parts.append(f"* {t.title}: {links}")
        parts += [
            "* every recorded metric of every setting, long format (mean, std, ci95, n, min, max): [csv](summary.csv)",
            "",
        ]
    skipped = [f for f in figures if f.skipped is not None]
    if skipped or notes:
        parts += ["## Not shown", ""]
        parts += [f"* figure `{f.name}` skipped: {f.skipped}" for f in skipped]
        parts += [f"* {n}" for n in notes]
        parts.append("")
    parts += ["## Conventions", ""] + [f"* {c}" for c in conventions(study)] + [""]
    return "\n".join(parts)


def _candidate_tables(study: Study, main: Table) -> list[Table]:
    """Every table the study's runs call for, in index order (an empty one is listed under "Not shown")."""
    candidates = [
        main,
        speedup_table(study),
        cost_table(study),
        pos_divergence_table(study),
        seeds_table(study),
        *ablation_tables(study),
    ]
    curves = convergence_frame(study)
    if not curves.empty:  # training stages recorded curves (optim.curve_every / until)
        candidates.append(convergence_table(study, curves))
    if study.report_settings["pairs"]:
        candidates.append(pairs_table(study))
        if study.ablation_keys:  # a grid of settings: each pair in every cell, and its trend along the axes
            candidates += [pair_grid_table(study), pair_trend_table(study)]
    if "knobs" in study.runs:  # sampler-knob sweeps: the matched-entropy comparison
        d = study.data
        h = float(d["entropy_nats"].mean()) if not d.empty and "entropy_nats" in d else None
        candidates.append(matched_entropy_table(study.models, h))
    if "gen_ppl_raw" in study.runs or "gen_ppl_first_scored" in study.runs:  # the protocol audit
        candidates.append(protocol_table(study.models))
    if "kind" in study.runs and bool((study.runs["kind"] == "exact").any()):
        candidates[1:1] = [decomposition_table(study), exact_samplers_table(study)]
    if "gen_ppl" in study.runs and "oracle_nll" in study.runs:  # an oracle study with a trained evaluator
        candidates.append(evaluator_check_table(study))
    if "gen_ppl" in study.runs and "gen_ppl_second" in study.runs:  # evaluator.second: a text study's check
        candidates.append(evaluator_agreement_table(study))
    kinds = set(study.runs["kind"]) if "kind" in study.runs else set()
    # metrics.exact_law, metrics.path_split: each diagnostic's table second, after the main one
    candidates[1:1] = [
        table(study) for k, table in ((SPLIT_KIND, path_split_table), (LAW_KIND, exact_law_table)) if k in kinds
    ]
    return candidates


def write_report(
    study_dir: str | Path, out_dir: str | Path | None = None, published: Sequence[str] | None = None
) -> ReportOutput:
    """Write the report of the study in `study_dir` (holding plan.json) to `out_dir` (default
    <study_dir>/report): table_*.{md,tex,csv}, summary.csv, fig_*.{png,pdf}, index.md, index.html (the same, one
    self-contained file: `fsdfm.report.html`) and results.json (`fsdfm.report.results_json`), each atomically.

    published: keys of `fsdfm.report.published.PUBLISHED` to add as labelled reference rows to the main table
    (an unknown key is an `UnknownNameError` listing the allowed keys, raised before anything is written).
    Figures without data are skipped and listed, with the reason, in the index and in `ReportOutput.skipped`.
    """

    published = list(published or [])
    for key in published:
        PUBLISHED.get(key)
    study = load_study(study_dir)
    out_dir = Path(out_dir) if out_dir is not None else study.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: list[tuple[Table, list[Path]]] = []
    notes: list[str] = []
    main = None
    if len(study.runs):
        main = main_table(study, published=published)
        candidates = _candidate_tables(study, main)
        for t in candidates:
            if t.empty:
                notes.append(f"table `{t.name}`: no data in this study")
                continue
            tables.append((t, write_table(t, out_dir)))
        atomic_write(out_dir / "summary.csv", summary_csv(study).to_csv(index=False).encode("utf-8"))
    figures: list[FigureResult] = []
    has_exact = "kind" in study.runs and bool((study.runs["kind"] == "exact").any())
    has_curves = any(t.name == "table_convergence" for t, _ in tables)  # drawn where the table has curves
    knob_figures = KNOB_FIGURES if "knobs" in study.runs else ()
    extra = (ORACLE_FIGURES if has_exact else ()) + (CURVE_FIGURES if has_curves else ()) + knob_figures
    extra += GRID_FIGURES if study.report_settings["pairs"] and study.ablation_keys else ()
    for name in FIGURE_ORDER + extra:
        if len(study.runs):
            figures += render(name, study, out_dir)
        else:
            figures.append(FigureResult(name=name, skipped="no finished runs"))
    import json

    index = out_dir / "index.md"
    text = _index(study, main, tables, figures, notes, out_dir)
    atomic_write(index, text.encode("utf-8"))
    html = out_dir / HTML_FILE
    atomic_write(html, html_report(f"Report: {study.name}", text, [t for t, _ in tables], out_dir).encode("utf-8"))
    results = out_dir / RESULTS_FILE
    doc = results_document(study, [t for t, _ in tables], figures)
    atomic_write(results, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    table_paths = [p for _, paths in tables for p in paths] + ([out_dir / "summary.csv"] if tables else [])
    return ReportOutput(
        index=index,
        tables=table_paths,
        figures=[p for f in figures for p in f.paths],
        skipped=[(f.name, f.skipped) for f in figures if f.skipped is not None],
        html=html,
        results=results,
    )
