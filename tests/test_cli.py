"""The command line: bad study directories are exit 2 with one message, and --threads reaches numpy's pools."""

from __future__ import annotations

import json
import os
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
    "metrics": {"names": ["oracle_nll"]},
    "methods": {"dfm": {"kind": "dfm", "budgets": [1]}},
}

CORRUPT_PLANS = {
    "truncated": '{"name": "tiny", "stages": {',
    "binary": "\x00\x01garbage",
    "not_a_plan": '["a", "list"]',
    "wrong_shapes": '{"name": "tiny", "stages": 5, "runs": "x"}',
    "bad_stage": '{"name": "tiny", "stages": {"abc": {"kind": "sample"}}, "runs": []}',
}


@pytest.mark.parametrize("cmd", ["status", "report", "samples"])
@pytest.mark.parametrize("plan", list(CORRUPT_PLANS))
def test_corrupt_plan_is_exit_2_naming_the_file(cmd, plan, tmp_path, capsys):
    sdir = tmp_path / "results" / "tiny"
    sdir.mkdir(parents=True)
    (sdir / "plan.json").write_text(CORRUPT_PLANS[plan])
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    for target in (sdir, spec):  # a study directory, or the spec that names it
        assert main(["--results", str(tmp_path / "results"), cmd, str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fsdfm {cmd}: error: ") and err.count("\n") == 1, err
        assert str(sdir / "plan.json") in err
    assert sorted(p.name for p in sdir.iterdir()) == ["plan.json"]


def test_status_of_a_spec_with_a_bad_name_is_exit_2(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "name": "../up"}))
    assert main(["--results", str(tmp_path / "results"), "status", str(spec)]) == 2
    assert "name:" in capsys.readouterr().err


HOOK = """
import importlib.abc, json, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("numpy", "torch") and name not in seen:
            seen[name] = os.environ.get("OMP_NUM_THREADS")
        return None
sys.meta_path.insert(0, Watch())
from fsdfm.cli import main
rc = main(sys.argv[1:])
print("SEEN " + json.dumps(seen))
sys.exit(rc)
"""


def test_threads_are_in_the_environment_before_numpy_and_torch_are_imported(tmp_path):
    """OpenMP/BLAS read OMP_NUM_THREADS when numpy/torch load: set later, inline runs compute with other pools
    than the local executor's fresh job processes (1-ulp differences)."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            HOOK,
            "--results",
            str(tmp_path / "results"),
            "run",
            str(spec),
            "--dry-run",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("SEEN "))[5:])
    assert seen == {"numpy": "1", "torch": "1"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--executor", "lcoal"], "did you mean 'local'"),
        (["--executor", "slurm", "--profile", "PROFILE"], "unknown section 'resorces'"),
        (["--executor", "slurm", "--profile", "MISSING"], "not found"),
    ],
    ids=["executor_typo", "profile_typo", "profile_missing"],
)
def test_bad_executor_or_profile_is_exit_2_before_plan_json(extra, expected, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    profile = tmp_path / "profile.yaml"
    profile.write_text("resorces: {gpu: {timeout_min: 5}}\n")
    extra = [str(profile) if a == "PROFILE" else str(tmp_path / "nope.yaml") if a == "MISSING" else a for a in extra]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["--results", str(tmp_path / "results"), "run", str(spec), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_profile_that_is_not_yaml_is_exit_2(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    (tmp_path / "p.yaml").write_text("defaults: [unclosed\n")
    assert (
        main(
            [
                "--results",
                str(tmp_path / "results"),
                "run",
                str(spec),
                "--executor",
                "slurm",
                "--profile",
                str(tmp_path / "p.yaml"),
            ]
        )
        == 2
    )
    assert "not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
