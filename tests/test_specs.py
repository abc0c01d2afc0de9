"""Spec loading and validation: malformed specs give one clear error naming file and key; nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsdfm.methods import plan_study
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec

REPO = Path(__file__).resolve().parents[1]
BAD = sorted((REPO / "tests" / "fixtures" / "bad_specs").glob("*.yaml"))

GOOD = """
name: good
data: {kind: text, train: data/tinystories/train.txt, valid: data/tinystories/valid.txt, seq_len: 32}
seed: 7
methods:
  dfm: {kind: dfm, rules: [euler, cumulative_scalar], budgets: [1, 8]}
  fs: {kind: fsdfm, teacher: dfm, budgets: [1, 8], distill: {shortcut: rk4}}
  fs_heun: {base: fs, distill: {shortcut: heun}}
grid:
  sampling.seed: [0, 1]
overrides:
  - match: {sampling.seed: 1}
    set: {sampling.n_samples: 8}
"""


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: ") :]


def test_there_are_at_least_ten_malformed_fixtures():
    assert len(BAD) >= 10


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_spec_is_one_clear_error(path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SpecError) as err:
        load_spec(path.relative_to(REPO))
    msg = str(err.value)
    assert str(path.relative_to(REPO)) in msg
    assert expected_message(path) in msg


@pytest.mark.parametrize("path", BAD[:3] + BAD[-2:], ids=[p.stem for p in BAD[:3] + BAD[-2:]])
def test_cli_exits_nonzero_and_writes_nothing(path, tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "--results", str(results), "run", str(path.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected_message(path) in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is False
    assert not results.exists()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_good_spec_expands_grid_bases_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, cells = load_spec(write(tmp_path, GOOD))
    assert [c.params for c in cells] == [{"sampling.seed": 0}, {"sampling.seed": 1}]
    assert cells[0].spec.sampling.n_samples == 64 and cells[1].spec.sampling.n_samples == 8
    # base inheritance: deep merge, child wins
    heun = spec.methods["fs_heun"]
    assert heun.kind == "fsdfm" and heun.teacher == "dfm" and heun.distill == {"shortcut": "heun"}
    # the study seed becomes every method's training seed
    assert spec.methods["dfm"].train.seed == 7 and spec.methods["fs"].train.seed == 7


def test_plan_shares_the_teacher_and_dedups_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, cells = load_spec(write(tmp_path, GOOD))
    plan = plan_study(spec.name, cells)
    kinds = [s.kind for s in plan.stages.values()]
    # one teacher for both students and both sampling seeds; one student per shortcut
    assert kinds.count("train_dfm") == 1
    assert kinds.count("distil_fsdfm") == 2
    assert kinds.count("train_ar") == 1  # the reference evaluator, shared by every cell
    # runs: per cell, data row + dfm 2 rules x 2 budgets + 2 students x 2 budgets = 9; two cells
    assert len(plan.runs) == 18
    # sampling depends on the seed: the sample stages differ across cells, training stages do not
    samples = [s for s in plan.stages.values() if s.kind == "sample"]
    assert len(samples) == 2 * (4 + 4)


def test_changed_setting_changes_exactly_its_dependents(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _, cells_a = load_spec(write(tmp_path, GOOD))
    plan_a = plan_study("a", cells_a)
    _, cells_b = load_spec(write(tmp_path, GOOD.replace("distill: {shortcut: rk4}", "distill: {shortcut: rk4, K: 8}")))
    plan_b = plan_study("b", cells_b)
    ids_a, ids_b = set(plan_a.stages), set(plan_b.stages)
    changed = {plan_b.stages[i].kind for i in ids_b - ids_a}
    # K changes both students (fs_heun inherits it), their sample/evaluate stages — never the teacher or evaluator
    assert changed == {"distil_fsdfm", "sample", "evaluate"}
    assert {s.id for s in plan_a.stages.values() if s.kind in ("train_dfm", "train_ar", "evaluate_data")} <= ids_b


def test_every_shipped_experiment_validates(monkeypatch):
    monkeypatch.chdir(REPO)
    specs = sorted((REPO / "experiments").glob("*.yaml"))
    assert specs
    for p in specs:
        spec, cells = load_spec(p.relative_to(REPO), check_files=False)
        plan = plan_study(spec.name, cells)
        assert plan.runs, p
        if spec.evaluator.kind != "hf":  # the paper specs need gpt2-large in the HF cache (not on this machine)
            load_spec(p.relative_to(REPO))


def test_report_settings_reach_the_plan_without_entering_stage_ids(monkeypatch):
    from fsdfm.study.graph import StudyPlan

    monkeypatch.chdir(REPO)
    spec, cells = load_spec("experiments/demo.yaml")
    plan = plan_study(spec.name, cells)
    d = plan.to_dict()
    assert d["report"]["mauve_min_n"] == 256
    assert [tuple(p) for p in d["report"]["pairs"]] == [
        ("fsdfm@8", "dfm_1024@1024"),
        ("fsdfm@8", "dfm/cumulative_scalar@8"),
    ]
    assert StudyPlan.from_dict(json.loads(json.dumps(d))).report["pairs"][0] == ["fsdfm@8", "dfm_1024@1024"]
    assert all("report" not in s.config and "pairs" not in json.dumps(s.config) for s in plan.stages.values())
    assert "gen_ppl_seq_mean" in spec.metrics.names and spec.metrics.mauve_seeds == 5


def test_paper_1p3b_trains_with_the_official_recipes(monkeypatch):
    """The student and teacher optimiser settings of apple/ml-fs-dfm's fs_dfm/ and pre_training/ configs."""
    monkeypatch.chdir(REPO)
    spec, _ = load_spec("experiments/paper_1p3b.yaml", check_files=False)
    student, teacher = spec.methods["fsdfm"].train, spec.methods["dfm"].train
    assert (student.lr, student.weight_decay, student.betas) == (1e-5, 0.03, (0.9, 0.95))
    assert (student.steps, student.warmup_steps, student.batch_size, student.ema_decay) == (500_000, 10_000, 96, 0.9995)
    assert (student.min_lr_ratio, student.grad_clip) == (0.1, 1.0)
    assert (teacher.lr, teacher.weight_decay, teacher.betas) == (3e-4, 0.03, (0.9, 0.95))
    assert (teacher.steps, teacher.warmup_steps, teacher.batch_size) == (1_000_000, 10_000, 128)
    assert spec.methods["fsdfm"].distill["h_distribution"] == "inv_h" and spec.methods["dfm"].source == "uniform"
