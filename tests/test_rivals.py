"""The few-step rivals (sdtt, duo, dcd, di4c) train and sample in a tiny oracle study end to end, each found by
discovery (one file under fsdfm/methods/), NFE and training compute recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fsdfm.launch import execute
from fsdfm.methods import METHOD_KINDS, plan_study
from fsdfm.methods.load import load_spec
from fsdfm.records import load, load_records
from fsdfm.study.spec import SpecError

REPO = Path(__file__).resolve().parents[1]

STUDY = """
name: tiny_rivals
data:
  kind: oracle
  seq_len: 8
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.01, seed: 3, n_train: 200, n_valid: 32}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 10, batch_size: 4, seed: 5}
evaluator: {kind: none}
data_reference: false
methods:
  teacher: {kind: dfm, train: {steps: 6, batch_size: 8, warmup_steps: 2, ema_decay: 0.9}, budgets: [8]}
  sdtt: {kind: sdtt, teacher: teacher, distill: {rounds: 2, base_steps: 8}, train: {steps: 3, batch_size: 4, warmup_steps: 1, ema_decay: null}, budgets: [2]}
  duo: {kind: duo, distill: {curriculum_start: 0.0, curriculum_end: 0.5}, train: {steps: 4, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [ancestral, greedy_tail], budgets: [3]}
  dcd: {kind: dcd, teacher: duo, distill: {rounds: 2, base_steps: 8}, train: {steps: 2, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [greedy_tail], budgets: [2]}
  di4c: {kind: di4c, teacher: teacher, distill: {rounds: 2, base_steps: 8, lambda_samples: 2}, train: {steps: 2, batch_size: 4, warmup_steps: 1, ema_decay: null}, budgets: [2]}
metrics:
  names: [oracle_nll, entropy_nats]
"""


@pytest.fixture(scope="module")
def rivals_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rivals")
    (tmp / "tiny_rivals.yaml").write_text(STUDY)
    spec, cells = load_spec(tmp / "tiny_rivals.yaml")
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp / "results", executor="debug")
    return tmp, plan, summary


def test_sdtt_trains_its_rounds_and_samples(rivals_study):
    tmp, plan, summary = rivals_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "tiny_rivals")
    row = df[df.method == "sdtt"]
    assert len(row) == 1 and row.kind.item() == "sdtt" and row.steps.item() == 2
    assert row.nfe.item() == 2  # one student forward per step, counted by the sampler's counter
    assert row.oracle_nll.item() > 0
    (rec,) = load_records(tmp / "results" / "tiny_rivals", kind="distil_sdtt")
    m, p = rec["payload"]["metrics"], rec["payload"]
    # 2 rounds: 8 -> 4 -> 2 steps; 3 optimiser steps each on batches of 4 x 8 tokens, 2 teacher forwards a row
    assert p["rounds"] == [{"teacher_steps": 8, "student_steps": 4}, {"teacher_steps": 4, "student_steps": 2}]
    assert (m["rounds"], m["steps_per_round"], m["student_steps"]) == (2, 3, 2)
    assert (m["train_steps"], m["train_tokens"], m["train_teacher_nfe_per_row"]) == (6, 6 * 4 * 8, 2)
    assert m["train_wall_s"] > 0 and len(p["loss_curve"]) == 6


def test_duo_and_dcd_train_and_sample(rivals_study):
    tmp, plan, summary = rivals_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "tiny_rivals")
    duo = df[df.method == "duo"].sort_values("rule")
    assert list(duo.rule) == ["ancestral", "greedy_tail"] and (duo.nfe == 3).all()
    dcd = df[df.method == "dcd"]
    assert len(dcd) == 1 and dcd.nfe.item() == 2 and dcd.rule.item() == "greedy_tail"
    assert (df.oracle_nll > 0).all()
    (train,) = load_records(tmp / "results" / "tiny_rivals", kind="train_duo")
    assert train["payload"]["metrics"]["train_tokens"] == 4 * 4 * 8
    (rec,) = load_records(tmp / "results" / "tiny_rivals", kind="distil_dcd")
    m = rec["payload"]["metrics"]
    assert rec["payload"]["gaps"] == [1 / 8, 2 / 8]  # h = 2^r / base_steps
    assert (m["rounds"], m["train_steps"], m["train_tokens"], m["train_teacher_nfe_per_row"]) == (2, 4, 4 * 4 * 8, 1)


def test_di4c_trains_and_samples_counting_every_lambda_forward(rivals_study):
    tmp, plan, summary = rivals_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "tiny_rivals")
    row = df[df.method == "di4c"]
    assert len(row) == 1 and row.nfe.item() == 2 and row.oracle_nll.item() > 0
    (rec,) = load_records(tmp / "results" / "tiny_rivals", kind="distil_di4c")
    m = rec["payload"]["metrics"]
    assert (m["rounds"], m["student_steps"], m["train_tokens"]) == (2, 2, 4 * 4 * 8)
    assert (m["train_teacher_nfe_per_row"], m["train_student_nfe_per_row"]) == (2, 2)


def test_the_rival_kinds_are_listed_and_named_nowhere_else_in_fsdfm():
    out = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "ls", "methods"], capture_output=True, text=True, cwd=REPO, check=True
    )
    names = [k for k in ("sdtt", "duo", "dcd", "di4c") if k in METHOD_KINDS]
    assert names == ["sdtt", "duo", "dcd", "di4c"]
    for k in names:
        assert k in out.stdout
    for path in (REPO / "fsdfm").rglob("*.py"):
        rel = path.relative_to(REPO / "fsdfm")
        if rel.parts[0] == "methods" and rel.stem in names or (len(rel.parts) == 1 and rel.stem in names):
            continue  # the kind's own file and its library module
        text = path.read_text()
        for k in names:
            assert f'"{k}"' not in text and f"'{k}'" not in text, f"{rel} names the kind {k}"


def test_sdtt_needs_a_mask_source_teacher(tmp_path):
    bad = STUDY.replace("teacher: {kind: dfm,", "teacher: {kind: dfm, source: uniform,")
    (tmp_path / "s.yaml").write_text(bad)
    spec, cells = load_spec(tmp_path / "s.yaml")
    with pytest.raises(SpecError, match="mask-source"):
        plan_study(spec.name, cells)
