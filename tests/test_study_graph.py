"""Stage ids (content hashes), stage-kind registration, plan validation and topological waves."""

import hashlib
import json

import pytest

from fsdfm.registry import UnknownNameError
from fsdfm.io import canonical_json
from fsdfm.study.graph import (
    STAGE_KINDS,
    PlanError,
    RunSpec,
    Stage,
    StudyPlan,
    stage_id,
    stage_kind,
    waves,
)


@stage_kind("t_stages_noop", checkpointable=True, resources="gpu")
def _noop(config, inputs, out_dir):
    return {}


def test_id_is_sha256_of_canonical_json():
    s = Stage("train", {"lr": 0.001, "model": {"hidden": 64, "blocks": 2}}, {})
    text = json.dumps(
        {"kind": "train", "config": {"model": {"blocks": 2, "hidden": 64}, "lr": 0.001}, "inputs": {}},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert s.id == "train-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    # a golden value: a change to the hashing scheme would silently orphan every stored result
    assert s.id == "train-cbcdeb2a8ea8"
    assert canonical_json({"b": 1, "a": [1, 2.5]}) == '{"a":[1,2.5],"b":1}'


def test_id_ignores_key_order_and_copies_inputs():
    cfg = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    a = Stage("k", cfg, {"t": "train-1"})
    b = Stage("k", {"b": {"y": "z", "x": (1, 2)}, "a": 1}, {"t": "train-1"})
    assert a.id == b.id and a == b and hash(a) == hash(b)
    cfg["a"] = 2  # mutating the caller's dict after construction changes nothing
    assert a.config["a"] == 1 and a.id == b.id
    assert a.id == stage_id("k", {"a": 1, "b": {"x": [1, 2], "y": "z"}}, {"t": "train-1"})


def test_id_depends_on_kind_config_and_inputs():
    base = Stage("k", {"a": 1}, {"x": "s-1"})
    assert Stage("k2", {"a": 1}, {"x": "s-1"}).id != base.id
    assert Stage("k", {"a": 2}, {"x": "s-1"}).id != base.id
    assert Stage("k", {"a": 1}, {"x": "s-2"}).id != base.id
    assert Stage("k", {"a": 1}, {"y": "s-1"}).id != base.id


def _chain(lr: float, steps: int):
    """teacher -> student -> eval, plus an independent reference evaluator."""
    teacher = Stage("train", {"lr": lr, "seed": 0})
    student = Stage("distil", {"steps": 8}, {"teacher": teacher.id})
    ev = Stage("evaluate", {"n": steps}, {"model": student.id})
    ref = Stage("train_ref", {"lr": 0.1})
    return {"teacher": teacher, "student": student, "eval": ev, "ref": ref}


def test_a_changed_setting_changes_exactly_the_dependent_ids():
    a = _chain(lr=1e-3, steps=10)
    b = _chain(lr=2e-3, steps=10)  # teacher changed: teacher, student and eval change; ref does not
    assert {k for k in a if a[k].id != b[k].id} == {"teacher", "student", "eval"}
    c = _chain(lr=1e-3, steps=20)  # only the last stage changed
    assert {k for k in a if a[k].id != c[k].id} == {"eval"}


def test_config_must_be_json():
    with pytest.raises(TypeError, match=r"config of train stage.*opt\.betas\[0\].*set"):
        Stage("train", {"opt": {"betas": [{1, 2}]}})
    with pytest.raises(ValueError, match="lr = nan is not finite"):
        Stage("train", {"lr": float("nan")})
    with pytest.raises(TypeError, match="key 1"):
        Stage("train", {1: "a"})
    with pytest.raises(ValueError, match="stage kind"):
        Stage("a/b", {})
    with pytest.raises(TypeError, match="inputs"):
        Stage("k", {}, {"x": 3})


def test_stage_kind_registry():
    k = STAGE_KINDS.get("t_stages_noop")
    assert k.fn is _noop and k.checkpointable and k.resources == "gpu"
    assert k.module == __name__
    with pytest.raises(UnknownNameError, match="did you mean 't_stages_noop'"):
        STAGE_KINDS.get("t_stages_nop")
    with pytest.raises(ValueError, match="registered twice"):
        stage_kind("t_stages_noop")(_noop)


def _plan(stages, runs=()):
    return StudyPlan.from_stages("study", stages, list(runs))


def test_waves_are_topological_layers_in_plan_order():
    s = _chain(1e-3, 10)
    plan = _plan(
        [s["eval"], s["ref"], s["student"], s["teacher"]],
        [RunSpec("r0", {"method": "fsdfm", "sampler.steps": 8}, s["eval"].id)],
    )
    got = [[st.id for st in wave] for wave in waves(plan)]
    assert got == [[s["ref"].id, s["teacher"].id], [s["student"].id], [s["eval"].id]]
    assert plan.ancestors(s["eval"].id) == [s["student"].id, s["teacher"].id]


def test_shared_stages_collapse():
    t = Stage("train", {"seed": 0})
    students = [Stage("distil", {"steps": n}, {"teacher": t.id}) for n in (1, 2, 4)]
    plan = _plan([t, *students, Stage("train", {"seed": 0})])
    assert len(plan.stages) == 4
    assert [len(w) for w in waves(plan)] == [1, 3]


def test_missing_input_is_a_clear_error():
    st = Stage("distil", {}, {"teacher": "train-000000000000"})
    with pytest.raises(PlanError, match=r"input 'teacher' refers to stage 'train-000000000000'.*not in the plan"):
        _plan([st])


def test_cycle_is_detected():
    # content hashing makes a cycle impossible among honest ids; a hand-edited plan can still hold one
    a = Stage("k", {"n": 1}, {"prev": "B"})
    b = Stage("k", {"n": 2}, {"prev": "A"})
    c = Stage("k", {"n": 3}, {})
    with pytest.raises(PlanError, match=r"dependency cycle: (A -> B -> A|B -> A -> B)"):
        waves({"C": c, "A": a, "B": b})


def test_plan_validation_errors():
    t = Stage("train", {})
    with pytest.raises(PlanError, match="run 'r1' ends in stage 'nope'"):
        _plan([t], [RunSpec("r1", {}, "nope")])
    with pytest.raises(PlanError, match="run id 'r1' appears twice"):
        _plan([t], [RunSpec("r1", {}, t.id), RunSpec("r1", {}, t.id)])
    with pytest.raises(PlanError, match="stored under 'x'"):
        StudyPlan("study", {"x": t}, [])
    with pytest.raises(PlanError, match="study name"):
        StudyPlan("a/b", {t.id: t}, [])


def test_plan_round_trips_through_json():
    s = _chain(1e-3, 10)
    plan = _plan(list(s.values()), [RunSpec("r0", {"method": "fsdfm", "seed": 1}, s["eval"].id)])
    d = json.loads(json.dumps(plan.to_dict()))
    back = StudyPlan.from_dict(d)
    assert back.name == plan.name and list(back.stages) == list(plan.stages)
    assert back.runs == plan.runs
    d["stages"][s["eval"].id]["config"]["n"] = 11  # a hand edit no longer matches its id
    with pytest.raises(PlanError, match="does not match its content"):
        StudyPlan.from_dict(d)
