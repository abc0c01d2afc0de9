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
    "methods": {"dfm": {"kind": "dfm", "budgets": [1], "train": {"steps": 2, "warmup_steps": 1, "batch_size": 4}}},
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


# ------------------------------------------------------------------------------------- time of check
def test_a_stage_refuses_data_that_changed_since_planning(tmp_path):
    from fsdfm.fingerprint import DataChangedError, with_fingerprint

    data = tmp_path / "train.txt"
    data.write_text("the planned content\n")
    st = with_fingerprint(Stage("t_rel_teacher", {"value": 1, "data": {"train": str(data)}}))
    plan = StudyPlan.from_stages("toc", [st], [RunSpec(run_id="r", stage_id=st.id, params={})])
    sdir = write_plan(plan, tmp_path / "results")
    data.write_text("content written after planning\n")  # e.g. while a --no-wait SLURM job waited in the queue
    with pytest.raises(DataChangedError, match=r"data\.train .*train\.txt: changed since this study was planned"):
        run_stage(sdir, st.id)
    err = json.loads((stage_dir(sdir, st.id) / ERROR).read_text())
    assert err["type"] == "fsdfm.fingerprint.DataChangedError" and not (stage_dir(sdir, st.id) / RECORD).exists()
    data.write_text("the planned content\n")
    rec = run_stage(sdir, st.id)  # the planned content again: it runs, and records what it checked
    assert rec["data_read"] == st.fingerprint["data"] == {"train": "sha256:" + _sha256(data)}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ record digests
def test_a_hand_edited_record_is_reported_by_verify_and_kept_out_of_the_report(tmp_path, capsys):
    from fsdfm.records import content_digest, load

    root = tmp_path / "results"
    plan = study("a", (3,))
    execute(plan, root, executor="debug")
    eid = plan.runs[0].stage_id
    path = stage_dir(root / "a", eid) / RECORD
    rec = json.loads(path.read_text())
    assert rec["digest"] == content_digest(rec)
    assert list(load(root / "a")["score"]) == [21]
    rec["payload"]["metrics"]["score"] = 99  # a "better" number, typed in by hand
    path.write_text(json.dumps(rec, indent=2))
    capsys.readouterr()
    assert main(["--results", str(root), "verify", str(root / "a")]) == 1
    out = capsys.readouterr().out
    assert f"damaged  {eid}" in out and f"{path}: its content does not match its digest" in out
    with pytest.warns(UserWarning, match="does not match its digest"):
        df = load(root / "a")
    assert df.empty  # the edited value never reaches a table
    s = execute(plan, root, executor="debug")  # and a run redoes it
    assert eid in s.done and list(load(root / "a")["score"]) == [21]


def test_records_written_before_digests_still_load(tmp_path):
    """A record of an older fsdfm has no digest (none is committed here: the reports under results/ keep only
    their tables): it is still done, verified by its artefacts, and loaded."""
    from fsdfm.records import check_stage, load

    root = tmp_path / "results"
    plan = study("a", (3,))
    execute(plan, root, executor="debug")
    path = stage_dir(root / "a", plan.runs[0].stage_id) / RECORD  # the leaf: no other record holds its sha256
    rec = json.loads(path.read_text())
    del rec["digest"], rec["data_read"]
    path.write_text(json.dumps(rec, indent=2, sort_keys=True))
    assert check_stage(path.parent).state == "done"
    assert list(load(root / "a")["score"]) == [21]
    assert not execute(plan, root, executor="debug").done  # nothing redone


# ----------------------------------------------------------------------------------------------- healing
def test_damaged_model_and_checkpoint_heal_on_the_next_run(tmp_path, capsys):
    path = spec_file(tmp_path)
    root = tmp_path / "results"
    argv = ["--results", str(root), "run", str(path), "--executor", "debug"]
    assert main(argv) == 0
    sdir = root / "tiny"
    tid = next(p.name for p in (sdir / "stages").iterdir() if p.name.startswith("train"))
    before = json.loads((stage_dir(sdir, tid) / RECORD).read_text())
    d = stage_dir(sdir, tid)
    (d / "model.pt").write_bytes(b"rot")
    (d / "ckpt" / "checkpoint.pt").write_bytes(b"rot too")
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err  # used to fail on every re-run
    err = capsys.readouterr().err
    assert f"{d / 'ckpt' / 'checkpoint.pt'}: damaged checkpoint" in err
    after = json.loads((d / RECORD).read_text())
    assert after["artefacts"] == before["artefacts"]  # retrained from scratch to the same bytes
    assert (d / "ckpt" / "checkpoint.pt.damaged-1").read_bytes() == b"rot too"


def test_a_stage_that_died_without_error_json_is_failed_in_status(tmp_path):
    """kill -9 (or an abort in native code) leaves running.json and a stale lock, but no error.json."""
    from fsdfm.launch import status

    root = tmp_path / "results"
    plan = study("a", (1,))
    sdir = write_plan(plan, root)
    tid = teacher_id(plan)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = stage_dir(sdir, tid)
    info = {"host": __import__("socket").gethostname(), "pid": dead.pid, "pid_start": None, "job_id": None}
    (d / ".lock").write_text(json.dumps({**info, "time": "t"}))
    (d / "running.json").write_text(
        json.dumps({"hostname": info["host"], "pid": dead.pid, "attempt": 1, "start_time": "t"})
    )
    log = tmp_path / "job.err"
    log.write_text("Fatal Python error: Aborted\nlast words\n")
    (d / "submitted.json").write_text(json.dumps({"executor": "local", "job_id": "1", "time": "t", "stderr": str(log)}))
    st = {s.stage_id: s for s in status(sdir).stages}
    assert st[tid].state == "failed" and f"died without an error report (attempt 1, pid {dead.pid}" in st[tid].detail
    assert f"log {log}" in st[tid].detail and st[tid].error_tail[-1] == "last words"
    assert st[plan.runs[0].stage_id].state == "blocked"


# ---------------------------------------------------------------------------------------------- environment
import builtins  # noqa: E402
import errno  # noqa: E402
import io as _io  # noqa: E402


class _FullFile:
    """A file object whose writes fail as on a full disk (what the atomic writer's temp file meets)."""

    def __init__(self, f):
        self._f = f

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_full_for(monkeypatch, name: str) -> None:
    """Writes through `fsdfm.io.atomic_write` to files called `name` fail with ENOSPC."""
    import fsdfm.io

    real = os.fdopen

    def fdopen(fd, *a, **kw):
        f = real(fd, *a, **kw)
        return _FullFile(f) if f".{name}." in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(fsdfm.io.os, "fdopen", fdopen)


def test_disk_full_while_writing_the_plan_is_one_line_and_leaves_no_plan(tmp_path, capsys, monkeypatch):
    disk_full_for(monkeypatch, "plan.json")
    root = tmp_path / "results"
    assert main(["--results", str(root), "run", str(spec_file(tmp_path)), "--executor", "debug"]) == 2
    err = one_error_line(capsys, "run")
    assert f"{root / 'tiny' / 'plan.json'}: No space left on device; the disk is full" in err
    assert not (root / "tiny" / "plan.json").exists()
    assert not [p for p in (root / "tiny").iterdir() if p.name.endswith(".tmp")]  # no half-written temp file


def test_a_checkpoint_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import torch

    from fsdfm.io import StorageError
    from fsdfm.train import save_checkpoint

    disk_full_for(monkeypatch, "checkpoint.pt")
    with pytest.raises(StorageError, match=r"checkpoint\.pt: No space left on device; the disk is full") as e:
        save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def read_only(monkeypatch, root: Path) -> None:
    """Everything under `root` behaves as on a read-only file system (EROFS), as a `mount -o ro` would (a test
    cannot mount, and root ignores permission bits)."""
    top = os.path.abspath(root)

    def under(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fspath(p)).startswith(top)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    def guard(fn, n):
        def wrapped(*a, **kw):
            if kw.get("dir_fd") is not None or kw.get("src_dir_fd") is not None or any(under(p) for p in a[:n]):
                if fn is real["mkdir"] and os.path.lexists(a[0]):
                    return fn(*a, **kw)  # EEXIST comes first, as on a real read-only mount
                refuse(next((p for p in a[:n] if under(p)), top))
            return fn(*a, **kw)

        return wrapped

    real = {name: getattr(os, name) for name in ("mkdir", "symlink", "unlink", "rmdir", "replace", "rename")}
    for name, n in (("mkdir", 1), ("symlink", 2), ("unlink", 1), ("rmdir", 1), ("replace", 2), ("rename", 2)):
        monkeypatch.setattr(os, name, guard(real[name], n))
    real_open, real_bopen = os.open, builtins.open

    def os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and (under(path) or kw.get("dir_fd") is not None):
            refuse(path)
        return real_open(path, flags, *a, **kw)

    def b_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_bopen(file, mode, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(_io, "open", b_open)


@pytest.mark.parametrize("command", ["run", "report", "clean"])
def test_a_read_only_results_root_is_one_line_exit_2(command, tmp_path, capsys, monkeypatch):
    path = spec_file(tmp_path)
    root = tmp_path / "results"
    assert main(["--results", str(root), "run", str(path), "--executor", "debug"]) == 0
    before = listing(root)
    capsys.readouterr()
    read_only(monkeypatch, root)
    argv = {
        "run": ["run", str(path), "--executor", "debug"],
        "report": ["report", str(path)],
        "clean": ["clean", str(path), "--yes"],
    }[command]
    assert main(["--results", str(root), *argv]) == 2
    err = one_error_line(capsys, command)
    assert f"{root}" in err and "Read-only file system; the file system is read-only" in err, err
    monkeypatch.undo()
    assert listing(root) == before  # nothing changed


def test_fsdfm_cache_under_a_regular_file_is_named_before_anything_is_written(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("FSDFM_CACHE", str(tmp_path / "afile" / "cache"))
    root = tmp_path / "results"
    assert main(["--results", str(root), "run", str(spec_file(tmp_path)), "--executor", "debug"]) == 2
    err = one_error_line(capsys, "run")
    assert f"FSDFM_CACHE={tmp_path / 'afile' / 'cache'}: {tmp_path / 'afile'} is a file, not a folder" in err
    assert not root.exists()
