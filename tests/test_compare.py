"""`fsdfm compare` / `fsdfm.compare`: one table across two tiny studies, rows per (setting, study), cells and best
marks by the suite's rules, from study folders, spec files and results.json alike; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fsdfm
from fsdfm.report import write_report
from fsdfm.report.compare import CompareError
from test_report import _params, write_study

ROOT = Path(__file__).resolve().parents[1]

# gen_ppl per seed: study "old" and study "new" share DFM@8; "new" is far better there (significant with 3 seeds
# each), equal within noise at DFM@64; only "new" has FS-DFM@8
OLD = {("DFM", 8): [50.0, 52.0, 54.0], ("DFM", 64): [30.0, 31.0, 32.0]}
NEW = {("DFM", 8): [20.0, 21.0, 22.0], ("DFM", 64): [30.5, 31.5, 29.5], ("FS-DFM", 8): [25.0, 26.0, 27.0]}


def _study(root: Path, name: str, values: dict) -> Path:
    runs = [{"params": _params("data", "data (held-out)", None, None, seed=None), "metrics": {"gen_ppl": 18.0}}]
    for (label, steps), vs in values.items():
        for seed, v in enumerate(vs):
            kind = "fsdfm" if label == "FS-DFM" else "dfm"
            runs.append({"params": _params(kind, label, "euler", steps, seed=seed), "metrics": {"gen_ppl": v}})
    return write_study(root, name, runs)


def _rows(table) -> dict:
    cols = list(table.columns)
    out = {}
    for row, bold in zip(table.cells, table.bold):
        key = (row[cols.index("method")], row[cols.index("steps")], row[cols.index("study")])
        out[key] = (row[cols.index("gen_ppl ↓")], bold[cols.index("gen_ppl ↓")])
    return out


def _cell(vs) -> str:
    v = np.array(vs)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def test_compare_of_two_tiny_studies_gives_one_row_per_setting_and_study(tmp_path):
    old, new = _study(tmp_path, "old", OLD), _study(tmp_path, "new", NEW)
    result = fsdfm.compare(old, new, metrics=["gen_ppl"])
    rows = _rows(result.table)
    expected = {(label, str(steps), study) for study, vals in (("old", OLD), ("new", NEW)) for label, steps in vals}
    expected |= {("data (held-out)", "—", "old"), ("data (held-out)", "—", "new")}
    assert set(rows) == expected and len(result.table.cells) == 7
    for study, vals in (("old", OLD), ("new", NEW)):
        for (label, steps), vs in vals.items():
            assert rows[(label, str(steps), study)][0].startswith(_cell(vs)), (label, steps, study)
    # one setting's rows side by side: DFM@8 of old and new are adjacent
    order = [(r[0], r[2], r[3]) for r in result.table.cells]
    i = order.index(("DFM", "8", "old"))
    assert order[i + 1] == ("DFM", "8", "new") or order[i - 1] == ("DFM", "8", "new")
    # best: new's DFM@8 (20-22) beats the runner-up FS-DFM@8 (25-27) by Welch's t across seeds
    bold = [k for k, (_, b) in rows.items() if b]
    assert bold == [("DFM", "8", "new")]
    assert result.studies == ("old", "new")
    assert result.frame.loc[[r[3] == "new" and r[0] == "DFM" and r[2] == "8" for r in result.table.cells]][
        "gen_ppl_mean"
    ].item() == pytest.approx(21.0)


def test_compare_reads_results_json_and_spec_files_like_study_folders(tmp_path):
    old, new = _study(tmp_path, "old", OLD), _study(tmp_path, "new", NEW)
    write_report(old)
    spec = tmp_path / "new.yaml"
    spec.write_text("name: new\n")
    a = fsdfm.compare(old, new, metrics=["gen_ppl"]).table
    b = fsdfm.compare(old / "report" / "results.json", spec, results=tmp_path, metrics=["gen_ppl"]).table
    assert a.cells == b.cells and a.bold == b.bold
    with pytest.raises(CompareError, match="no study here"):
        fsdfm.compare(old, tmp_path / "nowhere")
    with pytest.raises(CompareError, match="named twice"):
        fsdfm.compare(old, old)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_cli_compare_prints_the_table_writes_it_and_refuses_bad_input(tmp_path):
    old, new = _study(tmp_path, "old", OLD), _study(tmp_path, "new", NEW)
    r = _cli("compare", str(old), str(new), "--metrics", "gen_ppl", "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "# compare: old vs new" in r.stdout and "| DFM" in r.stdout
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["rows"] == 7 and last["studies"] == ["old", "new"]
    assert {Path(p).name for p in last["files"]} == {"table_compare.md", "table_compare.tex", "table_compare.csv"}
    bad = _cli("compare", str(old), str(tmp_path / "missing"), cwd=tmp_path)
    assert bad.returncode == 2 and "missing" in bad.stderr and "no study here" in bad.stderr
    typo = _cli("compare", str(old), str(new), "--metrics", "gen_pp", cwd=tmp_path)
    assert typo.returncode == 2 and "gen_ppl" in typo.stderr  # did you mean
    rep = _cli("report", str(old), cwd=tmp_path)
    done = json.loads(rep.stdout.strip().splitlines()[-1])
    assert rep.returncode == 0 and Path(done["html"]).is_file() and Path(done["results"]).is_file()
    assert json.loads(Path(done["results"]).read_text())["study"] == "old"
