"""Extensions from one file outside the package, loaded as a user's plugin is: an entry point of the group
`fsdfm.plugins` in an installed distribution's metadata (here a `*.dist-info` folder on the PYTHONPATH of a fresh
`fsdfm` process), found by discovery (fsdfm.registry.discover) with no edit of fsdfm/.

Each test installs one fixture (tests/fixtures/plugins/*.py, tests/fixtures/unigram_kind.py) and runs a tiny study
through the command line: an update rule sampled, a method kind trained and sampled, a metric in the report's main
table, an executor that runs the study.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ORACLE_DATA = {
    "kind": "oracle",
    "seq_len": 16,
    "oracle": {
        "source": "markov",
        "vocab_size": 6,
        "order": 1,
        "support": 2,
        "epsilon": 0.05,
        "seed": 2,
        "n_train": 300,
        "n_valid": 64,
    },
}
TINY_TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "ema_decay": None}
TINY_MODEL = {"preset": "tiny", "hidden": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2}


def install_plugin(site: Path, fixture: Path) -> str:
    """Copy `fixture` to `site` as a module and write the metadata of a distribution that names it in the
    `fsdfm.plugins` entry-point group (what `pip install` of a plugin package leaves); returns the module name."""
    module = fixture.stem
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture, site / f"{module}.py")
    dist = site / f"fsdfm_plugin_{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fsdfm-plugin-{module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fsdfm.plugins]\n{module} = {module}\n")
    return module


def fsdfm_cli(site: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fsdfm.cli ARGS` in a fresh process whose path holds the repository and the plugin's site."""
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "FSDFM_PROGRESS": "0",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=600
    )


def write_spec(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_record(results: Path, study: str, kind: str) -> dict:
    """The record of the study's one stage of `kind`, with its folder under "_dir"."""
    (path,) = (results / study / "stages").glob(f"{kind}-*/record.json")
    return {**json.loads(path.read_text()), "_dir": path.parent}


def test_the_plugin_is_not_found_without_its_distribution(tmp_path):
    # the control: the same spec without the plugin installed names the unknown rule (nothing in fsdfm/ knows it)
    spec = write_spec(tmp_path / "s.yaml", rule_spec("halfway"))
    r = fsdfm_cli(tmp_path / "empty-site", "--results", str(tmp_path / "r"), "run", str(spec), "--dry-run")
    assert r.returncode == 2 and "'halfway' is not a rule of dfm" in r.stderr, r.stderr


def rule_spec(rule: str) -> dict:
    return {
        "name": "rule",
        "data": ORACLE_DATA,
        "model": TINY_MODEL,
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "sampling": {"n_samples": 8, "batch_size": 8, "seed": 1},
        "metrics": {"names": ["oracle_nll", "entropy_nats"]},
        "methods": {"dfm": {"kind": "dfm", "train": TINY_TRAIN, "rules": [rule], "budgets": [4]}},
    }


def test_a_plugin_update_rule_is_sampled_in_a_study(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, FIXTURES / "plugins" / "halfway_rule.py")
    spec = write_spec(tmp_path / "rule.yaml", rule_spec("halfway"))
    results = tmp_path / "results"
    listed = fsdfm_cli(site, "ls", "rules")
    assert listed.returncode == 0 and any(
        line.split()[:1] == ["halfway"] and "dfm" in line for line in listed.stdout.splitlines()
    ), listed.stdout
    r = fsdfm_cli(site, "--results", str(results), "run", str(spec), "--executor", "inline")
    assert r.returncode == 0, r.stderr[-2000:]
    sample = one_record(results, "rule", "sample")
    assert sample["status"] == "done" and sample["config"]["rule"] == "halfway" and sample["config"]["steps"] == 4
    tokens = np.load(sample["_dir"] / "samples.npy")
    assert tokens.shape == (8, 16) and tokens.min() >= 0 and tokens.max() < 6  # every mask replaced by a token
    assert one_record(results, "rule", "evaluate")["payload"]["metrics"]["oracle_nll"] > 0


def test_a_plugin_method_kind_is_trained_and_sampled_in_a_study(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, FIXTURES / "unigram_kind.py")
    raw = {
        "name": "uni",
        "data": ORACLE_DATA,
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "sampling": {"n_samples": 400, "batch_size": 400, "seed": 1},
        "metrics": {"names": ["oracle_nll", "entropy_nats"]},
        "methods": {"uni": {"kind": "unigram", "budgets": [1]}},
    }
    results = tmp_path / "results"
    r = fsdfm_cli(
        site, "--results", str(results), "run", str(write_spec(tmp_path / "uni.yaml", raw)), "--executor", "local"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fit = one_record(results, "uni", "fit_unigram")
    sample = one_record(results, "uni", "sample")
    assert sample["config"]["sampler"] == "unigram" and sample["config"]["rule"] == "marginal"
    tokens = np.load(sample["_dir"] / "samples.npy")
    # the known answer: 400 x 16 draws from the fitted marginal; each frequency within 5 standard errors of it
    probs = np.asarray(fit["payload"]["probs"])
    freq = np.bincount(tokens.ravel(), minlength=6) / tokens.size
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / tokens.size) + 1e-12)


def test_a_plugin_metric_is_shown_in_the_reports_main_table(tmp_path):
    pytest.importorskip("matplotlib")  # the report's extra
    site = tmp_path / "site"
    install_plugin(site, FIXTURES / "plugins" / "longest_run.py")
    raw = {
        "name": "runs",
        "data": ORACLE_DATA,
        "model": TINY_MODEL,
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "sampling": {"n_samples": 8, "batch_size": 8, "seed": 1},
        "metrics": {"names": ["oracle_nll", "longest_run"]},
        "methods": {"dfm": {"kind": "dfm", "train": TINY_TRAIN, "rules": ["cumulative_scalar"], "budgets": [2]}},
    }
    spec = write_spec(tmp_path / "runs.yaml", raw)
    results = tmp_path / "results"
    r = fsdfm_cli(site, "--results", str(results), "run", str(spec), "--executor", "inline")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = one_record(results, "runs", "evaluate")
    sample = one_record(results, "runs", "sample")
    tokens = np.load(sample["_dir"] / "samples.npy")
    # the known answer, computed here from the samples with a different method (run lengths from np.diff)
    expected = np.mean([np.max(np.diff(np.flatnonzero(np.r_[True, row[1:] != row[:-1], True]))) for row in tokens])
    assert ev["payload"]["metrics"]["longest_run"] == pytest.approx(expected)
    r = fsdfm_cli(site, "--results", str(results), "report", str(spec))
    assert r.returncode == 0, r.stderr[-2000:]
    main = (results / "runs" / "report" / "table_main.md").read_text()
    header = next(line for line in main.splitlines() if line.startswith("|"))
    assert "longest_run" in header, main
    assert f"{expected:.2f}"[:3] in main


def test_a_plugin_executor_runs_a_study(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, FIXTURES / "plugins" / "serial_executor.py")
    spec = write_spec(tmp_path / "ex.yaml", {**rule_spec("euler"), "name": "ex"})
    results, log = tmp_path / "results", tmp_path / "serial.log"
    r = fsdfm_cli(
        site, "--results", str(results), "run", str(spec), "--executor", "serial", env={"SERIAL_LOG": str(log)}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((results / "ex" / "plan.json").read_text())
    ran = log.read_text().split()
    # every stage of the plan ran once, through this executor, and is done
    assert sorted(ran) == sorted(plan["stages"]) and len(ran) == 3
    assert all(one_record(results, "ex", k)["status"] == "done" for k in ("train_dfm", "sample", "evaluate"))
