"""Reliability promises, each checked against the case that broke it (issue 23's hostile test of 9c2f443).

* Deletion is confined to what the store owns: `clean` (all, --kind, --failed), `--rerun` and migration delete
  only `<results>/_stages/<id>` or the study's own real folder; a link to an outside folder is unlinked, and the
  outside folder survives.
* The store's lock is the lock: `--rerun` of a stage another study is running (even before this study links it)
  is refused naming the holder's pid and study; `clean` of a study whose driver runs is refused.
* A study folder that is itself a symlink just works.

Stage kinds here are tiny (they write a file and return); real processes hold the locks where it matters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdfm.cli import main
from fsdfm.cli.run import _rerun
from fsdfm.cli.common import UsageError
from fsdfm.launch import execute, run_stage, write_plan
from fsdfm.records import ERROR, RECORD, is_done, stage_dir, store_dir
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

ROOT = Path(__file__).resolve().parents[1]


@stage_kind("t_rel_teacher")
def teacher_stage(config, inputs, out_dir):
    (out_dir / "model.txt").write_text(str(config["value"]))
    return {"metrics": {"value": config["value"]}}


@stage_kind("t_rel_eval")
def eval_stage(config, inputs, out_dir):
    v = int((Path(inputs["model"]) / "model.txt").read_text()) * config["times"]
    return {"metrics": {"score": v}}


def study(name: str, times=(1,), value: int = 7) -> StudyPlan:
    t = Stage("t_rel_teacher", {"value": value})
    evals = [Stage("t_rel_eval", {"times": k}, {"model": t.id}) for k in times]
    runs = [RunSpec(run_id=f"{name}-x{k}", stage_id=e.id, params={"times": k}) for k, e in zip(times, evals)]
    return StudyPlan.from_stages(name, [t, *evals], runs)


def teacher_id(plan: StudyPlan) -> str:
    return next(s.id for s in plan.stages.values() if s.kind == "t_rel_teacher")


def outside_folder(tmp_path: Path, name: str = "precious") -> Path:
    """A folder outside the results root that nothing may delete (its parent is named _stages, as the old
    `clean --kind` check looked for)."""
    d = tmp_path / "elsewhere" / "_stages" / name
    d.mkdir(parents=True)
    (d / "keep.txt").write_text("mine")
    (d / ERROR).write_text(json.dumps({"type": "X", "message": "looks failed"}))  # what clean --failed selects
    return d


def point_at(link: Path, target: Path) -> None:
    link.unlink()
    os.symlink(target, link)


def clean(root: Path, target: Path, *extra: str) -> int:
    return main(["--results", str(root), "clean", str(target), "--yes", *extra])


# ------------------------------------------------------------------------------------------ deletion
@pytest.mark.parametrize("extra", [(), ("--kind", "t_rel_teacher"), ("--failed",)], ids=["all", "kind", "failed"])
def test_clean_never_deletes_a_link_target_outside_the_store(tmp_path, extra):
    root = tmp_path / "results"
    plan = study("a")
    execute(plan, root, executor="debug")
    tid, outside = teacher_id(plan), outside_folder(tmp_path)
    link = root / "a" / "stages" / tid
    point_at(link, outside)
    assert clean(root, root / "a", *extra) == 0
    assert (outside / "keep.txt").read_text() == "mine"  # the outside folder survives ...
    assert not link.exists() and not link.is_symlink()  # ... and only the link went
    assert (store_dir(root, tid) / RECORD).is_file()  # the store's own copy was not this link's: untouched


def test_rerun_never_deletes_a_link_target_outside_the_store(tmp_path):
    root = tmp_path / "results"
    plan = study("a")
    execute(plan, root, executor="debug")
    tid, outside = teacher_id(plan), outside_folder(tmp_path)
    link = root / "a" / "stages" / tid
    point_at(link, outside)
    assert _rerun(plan, root / "a", ["t_rel_teacher"], False, str(root)) == [tid]
    assert (outside / "keep.txt").read_text() == "mine"
    assert not (store_dir(root, tid) / RECORD).exists()  # the store's folder of that id was emptied: redone
    s = execute(plan, root, executor="debug")  # the next plan write links the study to the store again
    assert tid in s.done and link.resolve() == store_dir(root, tid).resolve()
    assert (outside / "keep.txt").read_text() == "mine"


def test_a_store_folder_that_is_a_link_out_of_the_store_is_never_followed(tmp_path):
    """`<root>/_stages/<id>` replaced by a link to an outside folder: rerun, clean and migration leave it."""
    root = tmp_path / "results"
    plan = study("a")
    execute(plan, root, executor="debug")
    tid, outside = teacher_id(plan), outside_folder(tmp_path)
    real = store_dir(root, tid)
    os.rename(real, tmp_path / "moved")
    os.symlink(outside, real)
    _rerun(plan, root / "a", ["t_rel_teacher"], False, str(root))
    assert clean(root, root / "a") == 0
    # migration: an old-layout folder of that id is kept in the study, not moved into the outside folder
    old = root / "b" / "stages" / tid
    old.mkdir(parents=True)
    (old / "mine.txt").write_text("old")
    with pytest.warns(UserWarning, match="old layout kept"):
        write_plan(study("b"), root)
    assert (old / "mine.txt").read_text() == "old" and not old.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == [ERROR, "keep.txt"]


# --------------------------------------------------------------------------------------- concurrency
HOLD = (
    "import sys; from pathlib import Path; from fsdfm.records import stage_lock\n"
    "with stage_lock(Path(sys.argv[1]), study=sys.argv[2]):\n    print('held', flush=True); sys.stdin.readline()\n"
)


def hold_lock(folder: Path, study_name: str) -> subprocess.Popen:
    """A live process holding `folder`'s stage lock (as a run of `study_name` training it does) until told."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), study_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0


def test_rerun_of_a_stage_another_study_is_running_is_refused_before_this_study_links_it(tmp_path):
    root = tmp_path / "results"
    a, b = study("a", (1,)), study("b", (2,))
    tid = teacher_id(a)
    write_plan(b, root)  # b links the shared teacher; a has never been run: no link of a's yet
    (store_dir(root, tid) / "partial.pt").write_text("b is training")
    proc = hold_lock(store_dir(root, tid), "b")
    try:
        with pytest.raises(UsageError, match=rf"running \(pid {proc.pid} on .*study b"):
            _rerun(a, root / "a", ["t_rel_teacher"], False, str(root))
        assert (store_dir(root, tid) / "partial.pt").read_text() == "b is training"  # b's work and lock intact
        assert (store_dir(root, tid) / ".lock").is_file()
    finally:
        release(proc)
    _rerun(a, root / "a", ["t_rel_teacher"], False, str(root))  # once b is done: allowed
    assert not (store_dir(root, tid) / "partial.pt").exists()


def test_clean_keeps_a_stage_running_under_another_study(tmp_path, capsys):
    root = tmp_path / "results"
    a = study("a")
    execute(a, root, executor="debug")
    tid = teacher_id(a)
    proc = hold_lock(store_dir(root, tid), "b")
    try:
        assert clean(root, root / "a") == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["running"] == [tid] and (store_dir(root, tid) / RECORD).is_file()
    finally:
        release(proc)


DRIVER = """
import os, sys, time
from pathlib import Path
from fsdfm.launch import execute
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

@stage_kind("t_rel_quick")
def quick(config, inputs, out_dir):
    (out_dir / "a.txt").write_text("a")
    return {}

@stage_kind("t_rel_block")
def block(config, inputs, out_dir):
    print("running", flush=True)
    t = time.time()
    while not os.path.exists(sys.argv[2]) and time.time() - t < 60:
        time.sleep(0.02)
    return {"read": (Path(inputs["first"]) / "a.txt").read_text()}

q = Stage("t_rel_quick", {})
b = Stage("t_rel_block", {}, {"first": q.id})
plan = StudyPlan.from_stages("drv", [q, b], [RunSpec(run_id="r", stage_id=b.id, params={})])
s = execute(plan, sys.argv[1], executor="debug")
print("ok" if s.ok else s.failed, flush=True)
"""


def test_clean_of_a_study_whose_driver_runs_is_refused(tmp_path, capsys):
    root, go = tmp_path / "results", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(root), str(go)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        assert clean(root, root / "drv") == 2
        err = capsys.readouterr().err
        assert f"is being run by pid {proc.pid}" in err and "study drv" in err
        assert sum(1 for p in (root / "drv" / "stages").iterdir()) == 2  # nothing removed
    finally:
        go.touch()
        out = proc.communicate(timeout=60)[0]
    assert out.strip().splitlines()[-1] == "ok"
    assert clean(root, root / "drv") == 0  # the driver has ended: now allowed
    assert not any((root / "drv" / "stages").iterdir())


def test_a_stage_whose_link_was_removed_runs_in_the_store(tmp_path):
    root = tmp_path / "results"
    a = study("a")
    sdir = write_plan(a, root)
    tid = teacher_id(a)
    (sdir / "stages" / tid).unlink()
    run_stage(sdir, tid)
    assert (sdir / "stages" / tid).is_symlink() and (store_dir(root, tid) / RECORD).is_file()


# ------------------------------------------------------------------------------------------ environment
def test_a_study_folder_that_is_a_symlink_just_works(tmp_path):
    root = tmp_path / "results"
    real = tmp_path / "bigdisk" / "a"
    real.mkdir(parents=True)
    root.mkdir()
    os.symlink(real, root / "a")
    plan = study("a", (1, 3))
    s = execute(plan, root, executor="debug")
    assert s.ok and len(s.done) == 3
    tid = teacher_id(plan)
    assert (store_dir(root, tid) / RECORD).is_file() and is_done(stage_dir(root / "a", tid))
    assert execute(plan, root, executor="debug").skipped  # and a re-run finds everything done


# ----------------------------------------------------------------------------------- a real (tiny) study
import yaml  # noqa: E402

TINY = {
    "name": "tiny",
    "data": {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov", "vocab_size": 8, "order": 1, "support": 2}},
    "evaluator": {"kind": "none"},
    "metrics": {"names": ["oracle_nll", "entropy_nats"]},
    "data_reference": False,
    "sampling": {"n_samples": 4, "batch_size": 4},
    "model": {"preset": "tiny", "hidden": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2},
    "methods": {"dfm": {"kind": "dfm", "steps": [1], "train": {"steps": 2, "warmup_steps": 1, "batch_size": 4}}},
}
TRAIN_TXT = str(ROOT / "data" / "tinystories" / "train.txt")


def spec_file(tmp_path: Path, name: str = "tiny", **changes) -> Path:
    """TINY with `changes` (dotted keys) written to tmp_path/<name>.yaml."""
    spec = json.loads(json.dumps(TINY))
    spec["name"] = name
    for key, value in changes.items():
        *head, last = key.split(".")
        d = spec
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def listing(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fsdfm {command}: error: "), err  # one line, no traceback
    return err


# ---------------------------------------------------------------------------------------------- bounds
BOUNDS = {
    "train.steps": ({"methods.dfm.train.steps": 10**23}, "methods.dfm.train.steps", "years"),
    "n_samples": ({"sampling.n_samples": 10**12}, "sampling.n_samples", "TiB"),
    "batch_size": ({"sampling.batch_size": 10**8}, "sampling.batch_size", "GiB"),
    "train.batch_size": ({"methods.dfm.train.batch_size": 10**7}, "methods.dfm.train.batch_size", "GiB"),
    "hidden": ({"model.hidden": 10**7, "model.cond_dim": 16}, "methods.dfm.model.hidden", "parameters"),
    "bpe vocab": (
        {"data": {"kind": "text", "train": TRAIN_TXT, "valid": TRAIN_TXT, "seq_len": 8, "vocab_size": 10**8}},
        "data.vocab_size",
        "GPT-2 has",
    ),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_implausible_sizes_are_refused_at_load_naming_key_bound_and_override(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FSDFM_ALLOW_LARGE", raising=False)
    changes, key, estimate = BOUNDS[case]
    path = spec_file(tmp_path, **changes)
    results = tmp_path / "results"
    assert main(["--results", str(results), "run", str(path), "--executor", "debug"]) == 2
    err = one_error_line(capsys, "run")
    assert f"{key}:" in err and "plausibility bound" in err and estimate in err, err
    assert f"FSDFM_ALLOW_LARGE={key}" in err
    assert listing(results) == []  # nothing written
    if case == "train.steps":  # allowed deliberately: it loads and plans
        monkeypatch.setenv("FSDFM_ALLOW_LARGE", key)
        assert main(["--results", str(results), "run", str(path), "--dry-run"]) == 0


def test_max_parallel_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--results", str(tmp_path), "run", str(spec_file(tmp_path)), "--max-parallel", "0"])
    assert e.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_parallel must be an integer >= 1"):
        execute(study("a"), tmp_path, executor="local", max_parallel=0)
    assert listing(tmp_path) == ["tiny.yaml"]


def test_a_study_whose_metrics_are_only_oracle_corpus_metrics_runs(tmp_path, capsys):
    path = spec_file(tmp_path, **{"metrics.names": ["oracle_nll"]})
    assert main(["--results", str(tmp_path / "r"), "run", str(path), "--executor", "debug"]) == 0
    from fsdfm.records import load

    df = load(tmp_path / "r" / "tiny")
    assert len(df) == 1 and df["oracle_nll"].notna().all() and "entropy_nats" not in df.columns
