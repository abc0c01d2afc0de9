"""Command-line overrides, sweeps and --limit (fsdfm/study/overrides.py): the same validated, content-addressed plan as
the YAML holding the same values; a bad override is one message naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fsdfm.cli import main
from fsdfm.methods import plan_study
from fsdfm.study.overrides import apply_overrides, parse_overrides, study_name
from fsdfm.methods.load import load
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec

# a teacher and its student on an oracle source: no data files, no evaluator, planning takes milliseconds
SPEC = {
    "name": "tiny",
    "seed": 0,
    "data": {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov", "vocab_size": 8, "order": 1, "support": 2}},
    "evaluator": {"kind": "none"},
    "metrics": {"names": ["oracle_nll"]},
    "sampling": {"n_samples": 4, "batch_size": 4, "seed": 0},
    "methods": {
        "dfm": {"kind": "dfm", "budgets": [1], "train": {"steps": 40, "warmup_steps": 5}},
        "fsdfm": {
            "kind": "fsdfm",
            "teacher": "dfm",
            "budgets": [1],
            "distill": {"K": 3},
            "train": {"steps": 30, "warmup_steps": 5},
        },
    },
}


def write(tmp_path: Path, raw: dict, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def plan_of(path: Path, words: list[str] = (), limit: int | None = None):
    r = load(path, parse_overrides(list(words)), limit, check_files=False)
    return plan_study(r.name, r.cells)


def descendants(plan, roots: set[str]) -> set[str]:
    """`roots` and every stage that reads one of them, transitively (from the inputs graph)."""
    out = set(roots)
    grew = True
    while grew:
        grew = False
        for sid, s in plan.stages.items():
            if sid not in out and set(s.inputs.values()) & out:
                out.add(sid)
                grew = True
    return out


def test_parse_overrides_values_sweeps_and_grid_axes():
    got = parse_overrides(
        [
            "sampling.seed=3",
            "seed=0,1,2",
            "methods.fsdfm.distill.shortcut=heun",
            "methods.dfm.budgets=[1, 8]",
            "grid.sampling.seed=[4,5]",
            "label='a,b'",
            "x.y=null",
        ]
    )
    assert got == {
        "sampling.seed": 3,
        "grid.seed": [0, 1, 2],
        "methods.fsdfm.distill.shortcut": "heun",
        "methods.dfm.budgets": [1, 8],
        "grid.sampling.seed": [4, 5],
        "label": "a,b",
        "x.y": None,
    }
    with pytest.raises(SpecError, match="'seed': expected KEY=VALUE"):
        parse_overrides(["seed"])
    with pytest.raises(SpecError, match="given twice"):
        parse_overrides(["seed=1", "seed=2"])


def test_an_override_changes_exactly_the_stage_ids_that_depend_on_it(tmp_path):
    spec = write(tmp_path, SPEC)
    base = plan_of(spec)
    student = {sid for sid, s in base.stages.items() if s.kind == "distil_fsdfm"}
    sample_stages = {sid for sid, s in base.stages.items() if s.kind == "sample"}
    data_row = {sid for sid, s in base.stages.items() if s.kind == "evaluate_data"}
    cases = {
        # the student's K: the student and what reads it; the teacher and its own samples keep their ids
        "methods.fsdfm.distill.K=4": descendants(base, student),
        # the sampling seed: every sample stage and its evaluation, and the data row's seeded subset; no training
        "sampling.seed=7": descendants(base, sample_stages) | data_row,
        # the teacher's training steps: every model stage and its samples (the student distils from it), but
        # not the data row, which reads no model
        "methods.dfm.train.steps=41": set(base.stages) - data_row,
    }
    for word, expected in cases.items():
        other = plan_of(spec, [word])
        gone = set(base.stages) - set(other.stages)
        assert gone == expected, word
        assert len(other.stages) == len(base.stages), word  # one new stage for each one that changed
    # the same value as the file's is the same plan
    assert set(plan_of(spec, ["methods.fsdfm.distill.K=3"]).stages) == set(base.stages)


def test_a_command_line_sweep_equals_the_same_grid_in_yaml(tmp_path):
    spec = write(tmp_path, SPEC)
    in_yaml = write(tmp_path, {**SPEC, "grid": {"seed": [0, 1], "sampling.seed": [2, 3]}}, "grid.yaml")
    want = plan_study("x", load_spec(in_yaml, check_files=False)[1])
    for words in (["seed=0,1", "sampling.seed=2,3"], ["grid.seed=[0, 1]", "grid.sampling.seed=[2,3]"]):
        got = plan_of(spec, words)
        assert set(got.stages) == set(want.stages)
        assert [(r.run_id, r.params, r.stage_id) for r in got.runs] == [
            (r.run_id, r.params, r.stage_id) for r in want.runs
        ]
        assert {k: v for k, v in got.to_dict().items() if k != "name"} == {
            k: v for k, v in want.to_dict().items() if k != "name"
        }


def test_an_override_of_a_grid_axis_replaces_the_axis(tmp_path):
    spec = write(tmp_path, {**SPEC, "grid": {"seed": [0, 1, 2]}})
    got = plan_of(spec, ["seed=1"])
    want = plan_of(write(tmp_path, {**SPEC, "grid": {"seed": [1]}}, "one.yaml"))
    assert set(got.stages) == set(want.stages) and [r.params for r in got.runs] == [r.params for r in want.runs]
    assert {r.params["seed"] for r in got.runs} == {1}


def test_apply_overrides_leaves_the_input_alone_and_writes_nested_keys():
    raw = json.loads(json.dumps(SPEC))
    out = apply_overrides(raw, {"methods.fsdfm.distill.shortcut": "heun", "sampling.seed": 5}, "s.yaml")
    assert out["methods"]["fsdfm"]["distill"] == {"K": 3, "shortcut": "heun"} and out["sampling"]["seed"] == 5
    assert raw == SPEC


BAD = {
    "sampling.n_sampels=3": ["override sampling.n_sampels=3", "did you mean 'n_samples'"],
    "methods.fsdm.budgets=[2]": ["override methods.fsdm.budgets=[2]", "did you mean 'fsdfm'"],
    "sampling.precision=float16": ["override sampling.precision=float16", "float64 or float32"],
    "methods.fsdfm.distill.K=many": ["override methods.fsdfm.distill.K=many", "distill.K"],
    "grid.seed=3": ["override grid.seed=3", "non-empty list"],
    "seed": ["override 'seed'", "KEY=VALUE"],
    "sampling.seed=[1": ["override 'sampling.seed=[1'", "not valid YAML"],
}


@pytest.mark.parametrize("word", list(BAD))
def test_a_bad_override_is_exit_2_naming_it_and_writes_nothing(word, tmp_path, capsys):
    spec = write(tmp_path, SPEC)
    results = tmp_path / "results"
    for cmd in (
        ["run", str(spec), word, "--dry-run"],
        ["run", str(spec), word, "--executor", "debug"],
        ["status", str(spec), word],
        ["report", str(spec), word],
    ):
        assert main(["--results", str(results), *cmd]) == 2, cmd
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
        for part in BAD[word]:
            assert part in captured.err, (cmd, captured.err)
        assert json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
    assert not results.exists()


def test_limit_shrinks_samples_and_training_as_the_spec_declares(tmp_path):
    spec = write(tmp_path, {**SPEC, "limit": {"train_steps": 6, "set": {"methods.fsdfm.distill.K": 2}}})
    r = load(spec, {}, 2, check_files=False)
    assert r.name == "tiny+limit-2"
    s = r.spec
    assert (s.sampling.n_samples, s.sampling.batch_size) == (2, 2)
    assert (s.methods["dfm"].train.steps, s.methods["dfm"].train.warmup_steps) == (6, 5)  # 40 -> 6; 5 stays
    assert s.methods["fsdfm"].train.steps == 6 and s.methods["fsdfm"].distill["K"] == 2
    # an explicit override wins over the limit section
    assert load(spec, {"methods.dfm.train.steps": 3}, 2, check_files=False).spec.methods["dfm"].train.steps == 3
    # without a limit section only the samples shrink
    plain = load(write(tmp_path, SPEC, "plain.yaml"), {}, 3, check_files=False).spec
    assert plain.sampling.n_samples == 3 and plain.methods["dfm"].train.steps == 40
    # the limit section is in no stage id: the file with and without it plans the same stages
    assert set(plan_of(spec).stages) == set(plan_of(tmp_path / "plain.yaml").stages)


def test_study_names_keep_overridden_studies_apart():
    assert study_name("demo", {}, None) == "demo"
    assert study_name("demo", {"seed": 3}, None) == "demo+seed-3"
    assert (
        study_name("demo", {"sampling.seed": 1, "grid.seed": [0, 1]}, 4) == "demo+limit-4+grid.seed-0_1+sampling.seed-1"
    )
    assert study_name("demo", {"seed": 1, "sampling.seed": 1}, None) == study_name(
        "demo", {"sampling.seed": 1, "seed": 1}, None
    )
    hashed = study_name("demo", {"data.train": "/some/where/else.txt"}, None)
    assert hashed.startswith("demo+") and len(hashed) == len("demo+") + 10
    assert study_name("demo", {"name": "mine", "seed": 2}, None) == "mine"


def test_print_config_is_a_spec_that_plans_the_same_study(tmp_path, capsys):
    spec = write(tmp_path, SPEC)
    words = ["seed=0,1", "methods.fsdfm.distill.K=4"]
    assert main(["--results", str(tmp_path / "results"), "run", str(spec), *words, "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = write(tmp_path, yaml.safe_load(out.rsplit("\n", 2)[0]), "printed.yaml")
    assert json.loads(out.strip().splitlines()[-1])["study"] == "tiny+grid.seed-0_1+methods.fsdfm.distill.K-4"
    assert set(plan_study("x", load_spec(printed, check_files=False)[1]).stages) == set(plan_of(spec, words).stages)
    assert not (tmp_path / "results").exists()


def test_the_shipped_demo_declares_a_smoke_run():
    repo = Path(__file__).resolve().parents[1]
    r = load(repo / "experiments" / "demo.yaml", {}, 8, check_files=False)
    assert r.name == "demo+limit-8" and r.spec.sampling.n_samples == 8
    assert all(m.train.steps <= 20 for m in r.spec.methods.values()) and r.spec.evaluator.train.steps == 20
    assert max(s for m in r.spec.methods.values() for s in m.budgets) == 16


def test_a_bad_limit_section_names_the_limit(tmp_path):
    spec = write(tmp_path, {**SPEC, "limit": {"set": {"methods.dfm.budgets": []}}})
    with pytest.raises(SpecError, match=r"--limit 2 \(from its limit: section, methods.dfm.budgets=\[\]\)"):
        load(spec, {}, 2, check_files=False)
    load(spec, {}, None, check_files=False)  # without --limit the section does nothing
