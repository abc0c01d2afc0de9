"""The researcher's command line: overrides find the same study in every command, status before the first run
and --follow, `fsdfm ls`, --results anywhere, --executor slurm without a profile, a closed pipe, a missing extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsdfm.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "tiny",
    "data": {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov", "vocab_size": 8, "order": 1, "support": 2}},
    "evaluator": {"kind": "none"},
    "metrics": {"names": ["oracle_nll", "entropy_nats"]},
    "data_reference": False,
    "sampling": {"n_samples": 4, "batch_size": 4},
    "model": {"preset": "tiny", "hidden": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2},
    "methods": {"dfm": {"kind": "dfm", "budgets": [1], "train": {"steps": 2, "warmup_steps": 1, "batch_size": 4}}},
}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The tiny study run once with the override seed=3 (debug executor); (spec path, results root)."""
    tmp = tmp_path_factory.mktemp("workflow")
    spec = tmp / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    results = tmp / "results"
    assert main(["--results", str(results), "run", str(spec), "seed=3", "--executor", "debug"]) == 0
    return spec, results


def test_overrides_find_the_same_study_in_every_command(ran, capsys):
    spec, results = ran
    studies = sorted(p.name for p in results.iterdir() if not p.name.startswith((".", "_")))  # _stages: the store
    assert studies == ["tiny+seed-3"]
    capsys.readouterr()
    assert main(["status", str(spec), "seed=3", "--results", str(results)]) == 0  # --results after the command
    st = last_json(capsys.readouterr().out)
    assert st["study"] == "tiny+seed-3" and st["done"] == 3 and st["pending"] == 0 and st["planned"] is False
    assert main(["--results", str(results), "verify", str(spec), "seed=3"]) == 0
    assert last_json(capsys.readouterr().out)["done"] == 3
    assert main(["--results", str(results), "samples", str(spec), "seed=3", "-n", "1"]) == 0
    assert last_json(capsys.readouterr().out)["study"] == "tiny+seed-3"  # token-only oracle data: no texts
    # the spec without the override is another study, not run yet: everything pending, nothing written
    assert main(["--results", str(results), "status", str(spec)]) == 0
    out = capsys.readouterr().out
    st = last_json(out)
    assert (st["study"], st["pending"], st["done"], st["planned"]) == ("tiny", 3, 0, True)
    assert "3 pending" in out and not (results / "tiny").exists()
    # a study directory takes no overrides
    assert main(["--results", str(results), "status", str(results / "tiny+seed-3"), "seed=1"]) == 2
    assert "overrides and --limit go with a spec file" in capsys.readouterr().err


def test_ls_lists_studies_with_done_over_total(ran, capsys):
    spec, results = ran
    (results / "half").mkdir()
    plan = json.loads((results / "tiny+seed-3" / "plan.json").read_text())
    (results / "half" / "plan.json").write_text(json.dumps({**plan, "name": "half"}))  # planned, nothing run
    capsys.readouterr()
    assert main(["ls", "--results", str(results)]) == 0
    rows = {r["name"]: r for r in last_json(capsys.readouterr().out)["studies"]}
    assert (rows["tiny+seed-3"]["stages_done"], rows["tiny+seed-3"]["stages_total"]) == (3, 3)
    assert (rows["tiny+seed-3"]["runs_done"], rows["tiny+seed-3"]["runs_total"]) == (1, 1)
    assert (rows["half"]["stages_done"], rows["half"]["stages_total"], rows["half"]["runs_done"]) == (0, 3, 0)


@pytest.mark.parametrize(
    "what,module,registry",
    [
        ("rules", "fsdfm.samplers", "RULE_KINDS"),  # every rule with its declared kinds, aliases included
        ("methods", "fsdfm.methods", "METHOD_KINDS"),
        ("metrics", "fsdfm.metrics.registry", "METRICS"),
        ("presets", "fsdfm.model", "PRESETS"),
        ("published", "fsdfm.report.published", "PUBLISHED"),
    ],
)
def test_ls_lists_every_registered_name(what, module, registry, capsys):
    import importlib

    assert main(["ls", what]) == 0
    out = capsys.readouterr().out
    reg = getattr(importlib.import_module(module), registry)
    names = list(reg) if isinstance(reg, dict) else reg.names()
    assert last_json(out)["names"] == names and len(out.splitlines()) == len(names) + 1
    assert main(["ls", "rulez"]) == 2 and "did you mean 'rules'" in capsys.readouterr().err


def test_status_follow_updates_until_everything_is_final(ran, capsys):
    spec, results = ran
    capsys.readouterr()
    assert main(["--results", str(results), "status", str(spec), "seed=3", "--follow", "--interval", "0.01"]) == 0
    assert last_json(capsys.readouterr().out)["updates"] == 1  # all done: the first update is the last
    assert (
        main(["--results", str(results), "status", str(spec), "--follow", "--interval", "0.01", "--max-updates", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert last_json(out)["updates"] == 3 and out.count("study tiny (") == 3


def test_slurm_without_a_profile_is_exit_2_and_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["--results", str(tmp_path / "results"), "run", str(spec), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "--executor slurm needs a cluster profile" in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_report_without_the_analysis_extra_names_it(ran, capsys, monkeypatch):
    spec, results = ran
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a bare `pip install fsdfm` lacks
    capsys.readouterr()
    assert main(["--results", str(results), "report", str(spec), "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fsdfm[analysis]'" in err and "'matplotlib'" in err and "Traceback" not in err
    assert not (results / "tiny+seed-3" / "report").exists()


def test_a_closed_pipe_ends_quietly():
    """`fsdfm ls metrics | head -0`: the reader is gone before the first write."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsdfm.cli", "ls", "metrics"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    proc.stdout.close()  # long before the interpreter has imported anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err
