"""`evaluator.second` (fsdfm.study.spec.SecondEvaluatorSpec): a second reference evaluator, trained by its own
stage, whose gen_ppl every evaluate stage records as gen_ppl_second; absent, no stage id moves."""

from __future__ import annotations

import csv
import json

import pytest

from fsdfm.cli import main
from fsdfm.methods import plan_study
from fsdfm.methods.load import load_spec
from fsdfm.metrics.evaluator import load_evaluator
from fsdfm.metrics.perplexity import gen_ppl
from fsdfm.records import stage_dir
from fsdfm.records.layout import read_record
from fsdfm.study.spec import SpecError

TEXT = "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n" * 20

SPEC = """
name: second_ev
data: {{kind: text, train: {train}, valid: {valid}, tokenizer: bpe, vocab_size: 300, seq_len: 16}}
model: {{preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}}
sampling: {{n_samples: 4, batch_size: 4, seed: 0}}
evaluator: {{kind: reference, train: {{steps: 2, batch_size: 4}}{second}}}
methods:
  dfm: {{kind: dfm, train: {{steps: 2, batch_size: 4}}, budgets: [1, 2]}}
metrics:
  names: [entropy_nats, gen_ppl]
"""
SECOND = ", second: {model: {hidden: 32, n_blocks: 2}, train: {steps: 3, batch_size: 4, seed: 5}}"


def _spec(tmp_path, second: str = SECOND):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(TEXT)
    valid.write_text(TEXT[::-1].replace("\n", " ") + "\n\n" + TEXT)
    p = tmp_path / "spec.yaml"
    p.write_text(SPEC.format(train=train, valid=valid, second=second))
    return p


def _plan(path):
    spec, cells = load_spec(path)
    return plan_study(spec.name, cells)


def test_the_second_evaluator_is_a_stage_of_its_own_and_absent_it_moves_no_id(tmp_path):
    with_second, without = _plan(_spec(tmp_path)), _plan(_spec(tmp_path, ""))
    evaluators = {sid: s for sid, s in with_second.stages.items() if s.kind == "train_ar"}
    assert len(evaluators) == 2
    second = next(sid for sid, s in evaluators.items() if s.config["model"].get("hidden") == 32)
    assert evaluators[second].config["optim"]["steps"] == 3
    scored = [s for s in with_second.stages.values() if s.kind in ("evaluate", "evaluate_data")]
    assert len(scored) == 3 and all(s.inputs["evaluator_second"] == second for s in scored)
    # without `second`, no evaluate stage has the input, and its config (hence its id) has no trace of the setting
    plain = [s for s in without.stages.values() if s.kind in ("evaluate", "evaluate_data")]
    assert all("evaluator_second" not in s.inputs and "second" not in s.config["evaluator"] for s in plain)
    assert set(without.stages) - set(with_second.stages) == {s.id for s in plain}


def test_a_second_evaluator_needs_a_first(tmp_path):
    p = _spec(tmp_path)
    p.write_text(p.read_text().replace("kind: reference", "kind: none"))
    with pytest.raises(SpecError, match="evaluator.second"):
        load_spec(p)


@pytest.mark.slow
def test_gen_ppl_second_is_gen_ppl_under_the_second_evaluators_model(tmp_path):
    spec = _spec(tmp_path)
    results = tmp_path / "results"
    assert main(["--results", str(results), "run", str(spec), "--executor", "debug"]) == 0
    plan = _plan(spec)
    study = results / plan.name
    second = next(
        sid for sid, s in plan.stages.items() if s.kind == "train_ar" and s.config["model"].get("hidden") == 32
    )
    first = next(sid for sid, s in plan.stages.items() if s.kind == "train_ar" and sid != second)
    ev2 = load_evaluator(str(stage_dir(study, second) / "hf"), device="cpu")
    ev1 = load_evaluator(str(stage_dir(study, first) / "hf"), device="cpu")
    for sid, s in plan.stages.items():
        if s.kind != "evaluate":
            continue
        metrics = read_record(stage_dir(study, sid))["payload"]["metrics"]
        lines = (stage_dir(study, s.inputs["samples"]) / "samples.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in lines]
        assert metrics["gen_ppl_second"] == pytest.approx(gen_ppl(texts, ev2).value, rel=1e-6)
        assert metrics["gen_ppl"] == pytest.approx(gen_ppl(texts, ev1).value, rel=1e-6)
        assert metrics["gen_ppl_second"] != pytest.approx(metrics["gen_ppl"], rel=1e-6)  # two different models
        assert metrics["samples_per_metric"]["gen_ppl_second"] == 4
        with open(stage_dir(study, sid) / "per_sample.csv") as f:
            header = next(csv.reader(f))
        assert any(c.endswith("_second") for c in header)


def test_an_external_file_is_scored_under_the_second_evaluator_too(tmp_path, capsys):
    """`fsdfm eval` of a study's own samples.npy gives the gen_ppl_second its evaluate stage recorded (the
    external kind reads the same second evaluator input; before version 3 it left it out)."""
    spec = _spec(tmp_path)
    results = tmp_path / "results"
    assert main(["--results", str(results), "run", str(spec), "--executor", "debug"]) == 0
    plan = _plan(spec)
    study = results / plan.name
    sid, stage = next((sid, s) for sid, s in plan.stages.items() if s.kind == "evaluate")
    want = read_record(stage_dir(study, sid))["payload"]["metrics"]
    capsys.readouterr()
    ids = stage_dir(study, stage.inputs["samples"]) / "samples.npy"
    assert main(["--results", str(results), "eval", str(ids), "--spec", str(spec)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]["metrics"]
    assert got["gen_ppl_second"] == want["gen_ppl_second"] and got["gen_ppl"] == want["gen_ppl"]
