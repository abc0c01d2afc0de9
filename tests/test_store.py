"""The shared stage store (fsdfm.records.store): two studies that plan the same stage run it once, old-layout study
folders are migrated without redoing work, `clean` of one study keeps what another still links, `--rerun`
redoes a shared stage for both, `load` reads each study's own runs, and `fsdfm ls` lists done/total.

The stage kinds are tiny and log every call to a counter file, so a test can tell exactly which stages ran."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from fsdfm.cli import main
from fsdfm.launch import execute, run_stage, write_plan
from fsdfm.io import read_json
from fsdfm.records import ATTEMPTS, RECORD, find_studies, is_done, list_studies, load, stage_dir
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind
from fsdfm.records import STORE, discard_stage, link_stages, linked_by, store_dir, unlink_stage


def _count(out_dir: Path) -> None:
    with open(os.environ["FSDFM_TEST_COUNTER"], "a") as f:
        f.write(out_dir.name + "\n")


@stage_kind("t_store_teacher")
def teacher_stage(config, inputs, out_dir):
    """A 'training' stage: the one a shared teacher must not repeat."""
    _count(out_dir)
    (out_dir / "model.txt").write_text(str(config["value"]))
    return {"metrics": {"value": config["value"]}}


@stage_kind("t_store_eval")
def eval_stage(config, inputs, out_dir):
    _count(out_dir)
    v = int((Path(inputs["model"]) / "model.txt").read_text()) * config["times"]
    return {"metrics": {"score": v}}


def study(name: str, times: list[int], value: int = 7) -> StudyPlan:
    """teacher(value) -> one eval per `times`; the teacher's id depends on `value` only, not on the study."""
    t = Stage("t_store_teacher", {"value": value})
    evals = [Stage("t_store_eval", {"times": k}, {"model": t.id}) for k in times]
    runs = [RunSpec(run_id=f"{name}-x{k}", stage_id=e.id, params={"times": k}) for k, e in zip(times, evals)]
    return StudyPlan.from_stages(name, [t, *evals], runs)


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "calls.txt"
    monkeypatch.setenv("FSDFM_TEST_COUNTER", str(path))

    def calls() -> dict:
        out: dict = {}
        for line in path.read_text().split() if path.exists() else []:
            out[line] = out.get(line, 0) + 1
        return out

    return calls


def teacher_id(plan: StudyPlan) -> str:
    return next(s.id for s in plan.stages.values() if s.kind == "t_store_teacher")


def test_two_studies_sharing_a_teacher_train_it_once(tmp_path, counter):
    a, b = study("sweep", [1, 2]), study("seeds", [3])
    tid = teacher_id(a)
    assert tid == teacher_id(b)
    execute(a, tmp_path, executor="debug")
    s = execute(b, tmp_path, executor="debug")
    assert counter()[tid] == 1 and tid in s.skipped
    assert (store_dir(tmp_path, tid) / ATTEMPTS).read_text().strip() == "1"
    for name in ("sweep", "seeds"):  # each study links the one copy, relatively
        link = tmp_path / name / "stages" / tid
        assert link.is_symlink() and os.readlink(link) == f"../../{STORE}/{tid}"
        assert link.resolve() == store_dir(tmp_path, tid).resolve()
    # the files live once; each study's runs are its own rows (no double counting, the store is no study)
    assert sorted(p.name for p in find_studies(tmp_path)) == ["seeds", "sweep"]
    df = load(tmp_path)
    assert sorted(df["run_id"]) == ["seeds-x3", "sweep-x1", "sweep-x2"]
    assert dict(zip(df["run_id"], df["score"])) == {"seeds-x3": 21, "sweep-x1": 7, "sweep-x2": 14}


def test_concurrent_studies_wait_on_the_shared_lock_and_run_it_once(tmp_path, counter):
    a, b = study("a", [1]), study("b", [2])
    tid = teacher_id(a)
    da, db = write_plan(a, tmp_path), write_plan(b, tmp_path)
    records = []
    threads = [threading.Thread(target=lambda d=d: records.append(run_stage(d, tid))) for d in (da, db)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter()[tid] == 1
    assert records[0]["provenance"]["start_time"] == records[1]["provenance"]["start_time"]  # the same record


def _to_old_layout(root: Path, sdir: Path) -> None:
    """Turn a study's links back into real folders and drop the store: what a study written before it looks like."""
    for link in (sdir / "stages").iterdir():
        real = link.resolve()
        link.unlink()
        shutil.move(str(real), str(link))
    shutil.rmtree(root / STORE)


def test_old_layout_study_is_migrated_and_rerun_redoes_nothing(tmp_path, counter):
    plan = study("old", [1, 2])
    sdir = execute(plan, tmp_path, executor="debug") and tmp_path / "old"
    before = load(sdir)
    _to_old_layout(tmp_path, sdir)
    assert not any(p.is_symlink() for p in (sdir / "stages").iterdir())
    # the old layout reads as it did (status/report/load read the same paths)
    assert load(sdir).equals(before) and all(is_done(stage_dir(sdir, s)) for s in plan.stages)
    n_calls = sum(counter().values())
    s = execute(plan, tmp_path, executor="debug")
    assert sorted(s.skipped) == sorted(plan.stages) and not s.done
    assert sum(counter().values()) == n_calls  # nothing redone
    for sid in plan.stages:  # migrated into the store on this first touch
        assert (sdir / "stages" / sid).is_symlink() and (store_dir(tmp_path, sid) / RECORD).is_file()
    assert load(sdir).equals(before)
    # and a new study that shares the migrated teacher reuses it
    execute(study("new", [5]), tmp_path, executor="debug")
    assert counter()[teacher_id(plan)] == 1


def test_old_layout_folder_kept_when_the_store_already_holds_the_id(tmp_path, counter):
    plan = study("dup", [1])
    tid = teacher_id(plan)
    (tmp_path / "dup" / "stages" / tid).mkdir(parents=True)
    (tmp_path / "dup" / "stages" / tid / "mine.txt").write_text("old")
    store_dir(tmp_path, tid).mkdir(parents=True)
    (store_dir(tmp_path, tid) / "theirs.txt").write_text("new")
    with pytest.warns(UserWarning, match="old layout kept"):
        rep = link_stages(tmp_path / "dup", [tid], tmp_path)
    assert rep.kept_local == (tid,)
    assert (tmp_path / "dup" / "stages" / tid / "mine.txt").read_text() == "old"  # nothing lost or overwritten
    assert (store_dir(tmp_path, tid) / "theirs.txt").read_text() == "new"


def test_clean_of_one_study_keeps_a_stage_another_still_links(tmp_path, counter, capsys):
    a, b = study("a", [1]), study("b", [2])
    tid = teacher_id(a)
    execute(a, tmp_path, executor="debug")
    execute(b, tmp_path, executor="debug")
    assert [p.name for p in linked_by(tmp_path / "a" / "stages" / tid, exclude=tmp_path / "a")] == ["b"]
    assert main(["--results", str(tmp_path), "clean", str(tmp_path / "a"), "--yes"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["shared"] == {tid: ["b"]}
    assert not (tmp_path / "a" / "stages" / tid).exists()
    assert is_done(stage_dir(tmp_path / "b", tid))  # b's teacher survives ...
    assert not store_dir(tmp_path, a.runs[0].stage_id).exists()  # ... a's own eval is gone from the store
    assert list(load(tmp_path / "b")["score"]) == [14]
    u = unlink_stage(tmp_path / "b", tid)  # the last link: now the files go
    assert u.deleted and not store_dir(tmp_path, tid).exists()


def test_rerun_of_a_shared_stage_is_seen_by_every_study(tmp_path, counter):
    a, b = study("a", [1]), study("b", [2])
    tid = teacher_id(a)
    execute(a, tmp_path, executor="debug")
    execute(b, tmp_path, executor="debug")
    discard_stage(tmp_path / "a", tid, tmp_path)
    assert not is_done(stage_dir(tmp_path / "b", tid)) and (tmp_path / "b" / "stages" / tid).is_dir()
    execute(a, tmp_path, executor="debug")
    s = execute(b, tmp_path, executor="debug")
    assert counter()[tid] == 2
    assert s.done == (b.runs[0].stage_id,)  # b's eval read the old teacher record: stale, redone
    assert read_json(stage_dir(tmp_path / "b", tid) / RECORD)["provenance"]["attempt"] == 1


def test_list_studies_and_ls(tmp_path, counter, capsys):
    execute(study("a", [1, 2]), tmp_path, executor="debug")
    write_plan(study("b", [3]), tmp_path)  # planned, not run (its teacher is a's: done)
    got = {s.name: (s.runs_done, s.runs_total, s.stages_done, s.stages_total) for s in list_studies(tmp_path)}
    assert got == {"a": (2, 2, 3, 3), "b": (0, 1, 1, 2)}
    assert list_studies(tmp_path / "nowhere") == []
    assert main(["--results", str(tmp_path), "ls"]) == 0
    out = capsys.readouterr().out
    b = next(line for line in out.splitlines() if line.split()[:1] == ["b"])
    assert b.split()[1:6] == ["stages", "1/2", "runs", "0/1", "partial"], b
    assert [s["name"] for s in json.loads(out.strip().splitlines()[-1])["studies"]] == ["a", "b"]


@stage_kind("t_store_where")
def where_stage(config, inputs, out_dir):
    return {"model_dir": str(inputs["model"])}


def test_stage_functions_are_handed_store_paths(tmp_path, counter):
    t = Stage("t_store_teacher", {"value": 1})
    w = Stage("t_store_where", {}, {"model": t.id})
    execute(
        StudyPlan.from_stages("w", [t, w], [RunSpec(run_id="r", stage_id=w.id, params={})]), tmp_path, executor="debug"
    )
    got = read_json(stage_dir(tmp_path / "w", w.id) / RECORD)["payload"]["model_dir"]
    assert Path(got) == store_dir(tmp_path, t.id)  # not <study>/stages/<id>: the same whichever study runs it
