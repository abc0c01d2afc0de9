"""The single-file deliverables of a report (index.html with every table and figure, results.json against its
documented schema), 95% CI bands, the quality-vs-NFE figure, and the HTML rendered in headless Chromium (slow)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import jsonschema  # the dev extra
import numpy as np
import pytest

from fsdfm.report import load_study, write_report
from fsdfm.report.nfe_figure import quality_vs_nfe
from fsdfm.report.results_json import RESULTS_SCHEMA, SCHEMA_VERSION, check_version
from test_report import T_975_2, _params, full_study, write_study


class _Tables(HTMLParser):
    """Every <table> as rows of cell texts, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _markdown_rows(md: str) -> list[list[str]]:
    """The pipe table of a table_*.md file as rows of cell texts (header first, ** markup dropped)."""
    rows = []
    for line in md.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|", line):
            rows.append([" ".join(c.replace("**", "").split()) for c in line.strip("|").split("|")])
    return rows


def test_html_report_holds_every_table_and_figure_of_the_markdown_report(tmp_path):
    sdir = full_study(tmp_path)
    out = write_report(sdir)
    assert out.html == sdir / "report" / "index.html"
    page = _Tables()
    page.feed(out.html.read_text())
    html_tables = page.tables
    table_files = sorted(p for p in out.tables if p.suffix == ".md")
    assert len(table_files) >= 5
    for md in table_files:
        rows = _markdown_rows(md.read_text())
        assert rows and any(t == rows for t in html_tables), f"{md.name} is not in index.html"
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images if src.startswith("data:image/png;")]
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", out.index.read_text())
    assert len(pngs) >= 5 and "fig_quality_vs_nfe.png" in pngs
    for name in pngs:  # every figure of index.md, embedded byte for byte (no file beside the HTML needed)
        assert (out.index.parent / name).read_bytes() in embedded, name
    assert not [src for src in page.images if not src.startswith("data:")]


def test_results_json_validates_against_the_documented_schema_and_holds_the_numbers(tmp_path):
    sdir = full_study(tmp_path)
    out = write_report(sdir)
    doc = json.loads(out.results.read_text())
    jsonschema.Draft202012Validator.check_schema(RESULTS_SCHEMA)
    jsonschema.Draft202012Validator(RESULTS_SCHEMA).validate(doc)
    check_version(doc, str(out.results))
    assert doc["schema_version"] == SCHEMA_VERSION and doc["study"] == "synth"
    # the FS-DFM (shortcut=rk4) setting at 8 steps: its three seeds' gen_ppl, read back from the records
    runs = [r for r in doc["runs"] if r["label"] == "FS-DFM (shortcut=rk4)" and r["steps"] == 8]
    values = np.array([r["metrics"]["gen_ppl"] for r in runs])
    assert sorted(r["seeds"]["seed"] for r in runs) == [0, 1, 2]
    (setting,) = [s for s in doc["settings"] if s["label"] == "FS-DFM (shortcut=rk4)" and s["steps"] == 8]
    stats = setting["metrics"]["gen_ppl"]
    assert stats["mean"] == pytest.approx(values.mean()) and stats["n"] == 3
    assert stats["ci95"] == pytest.approx(T_975_2 * values.std(ddof=1) / math.sqrt(3))
    (data,) = [s for s in doc["settings"] if s["kind"] == "data"]
    assert data["metrics"]["gen_ppl"]["std"] is None  # one value: no spread, null not NaN
    assert {t["name"] for t in doc["tables"]} >= {"table_main", "table_cost", "table_seeds"}
    assert {"fig_step_sweep.png", "fig_step_sweep.pdf"} <= {f for fig in doc["figures"] for f in fig["files"]}
    doc["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema_version"):
        check_version(doc, "x.json")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "schema_version": SCHEMA_VERSION, "runs": [{"run_id": 1}]}, RESULTS_SCHEMA)


def test_quality_vs_nfe_bands_are_95_percent_intervals_of_the_mean(tmp_path):
    values = {1: [40.0, 44.0, 45.0], 4: [30.0, 31.0, 35.0]}
    runs = [
        {"params": _params("dfm", "DFM", "euler", steps, seed=k), "metrics": {"gen_ppl": v, "nfe": steps}}
        for steps, vs in values.items()
        for k, v in enumerate(vs)
    ]
    (drawn,) = quality_vs_nfe(load_study(write_study(tmp_path, "nfe", runs)), metrics=("gen_ppl",))
    ax = drawn.figure.axes[0]
    (band,) = ax.collections
    verts = band.get_paths()[0].vertices
    for steps, vs in values.items():
        v = np.array(vs)
        half = T_975_2 * v.std(ddof=1) / math.sqrt(3)
        ys = verts[np.isclose(verts[:, 0], steps), 1]
        assert min(ys) == pytest.approx(v.mean() - half) and max(ys) == pytest.approx(v.mean() + half)
    assert "NFE" in ax.get_xlabel() and "95% CI" in drawn.caption


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(tmp_path):
    """Needs chromium (.ci/run installs it). In CI (CI set) a missing browser FAILS; elsewhere it skips."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium not installed (outside CI); apt-get install -y chromium")
    out = write_report(full_study(tmp_path))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            out.html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    dark = (img.mean(axis=2) < 0.5).mean()  # text and figure ink on a white page
    assert 0.005 < dark < 0.5, f"screenshot looks blank or black (dark fraction {dark:.4f})"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # figures' colours, not one flat colour
