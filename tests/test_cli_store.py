"""The CLI's result-integrity commands on a finished tiny study: damaged artefacts are redone (and only they and
their dependents), `verify` names the damage without running anything, `run --rerun KIND`, a metric's version
bump re-runs only the stages that compute it, and `clean` (all, --kind, --failed; --yes when not a terminal)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.cli import main
from fsdfm.launch import execute
from fsdfm.metrics.registry import METRICS
from fsdfm.methods.common import ArtefactError, load_dit
from fsdfm.io import read_json
from fsdfm.records import ERROR, RECORD, is_done, load_records, read_plan, stage_dir
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

SPEC = """
name: tiny_store
data:
  kind: oracle
  seq_len: 8
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.001, seed: 1, n_train: 64, n_valid: 16}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 4, batch_size: 4, seed: 0}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 3, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [euler], budgets: [1, 2]}
metrics:
  names: [entropy_nats, distinct_2]
"""
TIMING = {
    "wall_s",
    "tokens_per_s",
    "peak_mem",
    "cpu_s",
    "load_per_core",
}  # measured, so they differ between two honest runs


def cli(capsys, *argv) -> tuple[int, str, dict]:
    """(exit status, stdout, its last line as JSON) of `fsdfm ARGV` run in this process."""
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out, json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny study (train_dfm -> 2 x sample -> 2 x evaluate, plus evaluate_data)."""
    tmp = tmp_path_factory.mktemp("store")
    (tmp / "tiny_store.yaml").write_text(SPEC)
    assert main(["--results", str(tmp / "results"), "run", str(tmp / "tiny_store.yaml"), "--executor", "debug"]) == 0
    return tmp


@pytest.fixture
def study(finished, tmp_path):
    """A private copy of the finished study: (spec path, results root, study dir, {kind: [stage ids]})."""
    shutil.copytree(finished / "results", tmp_path / "results")
    spec = tmp_path / "tiny_store.yaml"
    spec.write_text(SPEC)
    sdir = tmp_path / "results" / "tiny_store"
    by_kind: dict = {}
    for sid, st in read_plan(sdir)["stages"].items():
        by_kind.setdefault(st["kind"], []).append(sid)
    return spec, tmp_path / "results", sdir, by_kind


def quality_metrics(sdir: Path) -> dict:
    """stage id -> metrics without the timing ones, for every done record."""
    return {
        Path(r["stage_dir"]).name: {
            k: v for k, v in r["payload"]["metrics"].items() if k not in TIMING and not k.startswith("train_")
        }
        for r in load_records(sdir)
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_model_redoes_training_and_its_dependents_with_the_same_metrics(study, capsys):
    spec, root, sdir, kinds = study
    before = quality_metrics(sdir)
    model = stage_dir(sdir, kinds["train_dfm"][0]) / "model.pt"
    truncate(model)
    with pytest.raises(ArtefactError, match="model.pt"):  # never a bare OSError naming no file
        load_dit(model.parent)
    code, out, res = cli(capsys, "--results", str(root), "verify", str(spec))
    assert code == 1 and not res["ok"] and res["damaged"] == 1
    assert str(model) in out and "truncated" in out
    code, out, res = cli(capsys, "--results", str(root), "status", str(spec))
    assert res["done"] == len(read_plan(sdir)["stages"]) - 1 and "damaged" in out  # status tells the truth too
    code, out, res = cli(capsys, "--results", str(root), "run", str(spec), "--executor", "debug")
    assert code == 0 and res["ok"]
    redone = set(kinds["train_dfm"] + kinds["sample"] + kinds["evaluate"])
    assert res["done"] == len(redone) and res["skipped"] == len(kinds["evaluate_data"])
    assert quality_metrics(sdir) == before
    assert cli(capsys, "--results", str(root), "verify", str(spec))[0] == 0


def test_truncated_samples_redo_only_that_sample_and_its_evaluation(study, capsys):
    spec, root, sdir, kinds = study
    before = quality_metrics(sdir)
    victim = kinds["sample"][0]
    truncate(stage_dir(sdir, victim) / "samples.npy")
    records = {sid: (stage_dir(sdir, sid) / RECORD).read_bytes() for sid in read_plan(sdir)["stages"]}
    code, out, res = cli(capsys, "--results", str(root), "run", str(spec), "--executor", "debug")
    assert code == 0 and res["done"] == 2
    changed = {sid for sid, b in records.items() if (stage_dir(sdir, sid) / RECORD).read_bytes() != b}
    evaluations = {
        sid for sid in kinds["evaluate"] if read_json(stage_dir(sdir, sid) / RECORD)["inputs"]["samples"] == victim
    }
    assert changed == {victim} | evaluations and len(evaluations) == 1
    code, out, res = cli(capsys, "verify", str(sdir))  # a study directory works as well as its spec
    assert code == 0 and res["ok"] and res["done"] == len(records)
    assert quality_metrics(sdir) == before


def test_rerun_sample_reruns_samples_and_their_evaluations_only(study, capsys):
    spec, root, sdir, kinds = study
    code, out, res = cli(capsys, "--results", str(root), "run", str(spec), "--dry-run", "--rerun", "sample")
    assert code == 0 and sorted(res["rerun"]) == sorted(kinds["sample"] + kinds["evaluate"])
    assert all(is_done(stage_dir(sdir, s)) for s in kinds["sample"])  # a dry run removes nothing
    code, out, res = cli(capsys, "--results", str(root), "run", str(spec), "--executor", "debug", "--rerun", "sample")
    assert code == 0 and res["ok"]
    assert res["done"] == len(kinds["sample"] + kinds["evaluate"])
    assert res["skipped"] == len(kinds["train_dfm"] + kinds["evaluate_data"])


def test_rerun_of_an_unknown_or_absent_kind_is_exit_2(study, capsys):
    spec, root, sdir, kinds = study
    code = main(["--results", str(root), "run", str(spec), "--rerun", "sampel"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'sample'" in err
    code = main(["--results", str(root), "run", str(spec), "--rerun", "train_ar"])
    assert code == 2 and "no 'train_ar' stage" in capsys.readouterr().err
    assert all(is_done(stage_dir(sdir, s)) for ids in kinds.values() for s in ids)


def test_metric_version_bump_reruns_only_the_stages_that_compute_it(study, capsys, monkeypatch):
    spec, root, sdir, kinds = study
    info = METRICS.get("distinct_2")
    monkeypatch.setitem(METRICS._items, "distinct_2", dataclasses.replace(info, version="2"))
    code, out, res = cli(capsys, "--results", str(root), "run", str(spec), "--executor", "debug")
    assert code == 0 and res["ok"]
    # the evaluate stages (and the data row) list distinct_2; training and sampling do not: they are reused
    assert res["done"] == len(kinds["evaluate"] + kinds["evaluate_data"])
    assert res["skipped"] == len(kinds["train_dfm"] + kinds["sample"])
    new = read_plan(sdir)["stages"]
    assert {s for s in new if s.startswith("evaluate")}.isdisjoint(kinds["evaluate"] + kinds["evaluate_data"])
    assert {s for s in new if not s.startswith("evaluate")} == set(kinds["train_dfm"] + kinds["sample"])
    rec = next(r for r in load_records(sdir, kind="evaluate"))
    # records store the versions: the listed metrics and the oracle metrics the oracle data adds
    assert rec["fingerprint"]["metrics"] == {
        "distinct_2": "2",
        "entropy_nats": "1",
        "oracle_nll": "1",
        "oracle_expected_nll": "1",
        "oracle_entropy_rate": "1",
        **{m: "1" for m in ("ngram_tv", "ngram_kl", "ngram_tv_floor", "ngram_kl_floor")},
    }


# ------------------------------------------------------------------------------------------------ clean
@stage_kind("t_cli_value")
def value_stage(config, inputs, out_dir):
    if config.get("fail"):
        raise ValueError("refused")
    (out_dir / "value.txt").write_text(str(config["value"]))
    return {"metrics": {"value": config["value"]}}


@pytest.fixture
def mixed(tmp_path):
    """A study with two done stages and one failed one (debug executor)."""
    a, b = Stage("t_cli_value", {"value": 1}), Stage("t_cli_value", {"value": 2})
    bad = Stage("t_cli_value", {"value": 3, "fail": True})
    plan = StudyPlan.from_stages("mixed", [a, b, bad], [RunSpec("r", {"method": "x"}, a.id)])
    summary = execute(plan, tmp_path, executor="debug")
    assert list(summary.failed) == [bad.id] and (stage_dir(tmp_path / "mixed", bad.id) / ERROR).exists()
    return tmp_path / "mixed", a, b, bad


def test_clean_failed_removes_only_failed_stages(mixed, capsys):
    sdir, a, b, bad = mixed
    code, out, res = cli(capsys, "clean", str(sdir), "--failed", "--yes")
    assert code == 0 and res["stages"] == [bad.id]
    assert not stage_dir(sdir, bad.id).exists()
    assert is_done(stage_dir(sdir, a.id)) and is_done(stage_dir(sdir, b.id))


def test_clean_needs_yes_when_not_a_terminal_and_then_removes_by_kind(mixed, capsys):
    sdir, a, b, bad = mixed
    code = main(["clean", str(sdir), "--kind", "t_cli_value"])  # pytest's stdin is not a terminal
    assert code == 2 and "--yes" in capsys.readouterr().err
    assert all(stage_dir(sdir, s.id).exists() for s in (a, b, bad))  # nothing removed
    assert main(["clean", str(sdir), "--kind", "t_cli_valeu", "--yes"]) == 2
    assert "did you mean 't_cli_value'" in capsys.readouterr().err
    code, out, res = cli(capsys, "clean", str(sdir), "--kind", "t_cli_value", "--yes")
    assert code == 0 and res["removed"] == 3 and not any((sdir / "stages").iterdir())


def test_clean_asks_on_a_terminal(mixed, capsys, monkeypatch):
    sdir, a, b, bad = mixed
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    code, out, res = cli(capsys, "clean", str(sdir))
    assert code == 0 and res["removed"] == 0 and "nothing removed" in out
    assert all(stage_dir(sdir, s.id).exists() for s in (a, b, bad))
    code, out, res = cli(capsys, "clean", str(sdir))
    assert code == 0 and sorted(res["stages"]) == sorted(s.id for s in (a, b, bad))
