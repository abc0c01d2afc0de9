"""Results layout: atomic writes, stage locks, provenance, corrupt records, `load()` and `load_records()`."""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from fsdfm import records
from fsdfm.launch import execute
from fsdfm.io import atomic_write, atomic_write_json, sha256_file, to_jsonable
from fsdfm.records import (
    LOCK,
    RECORD,
    StageLockedError,
    find_seeds,
    is_done,
    load,
    load_records,
    lock_holder,
    read_record,
    stage_dir,
    stage_lock,
)
from fsdfm.records import LockInfo, break_stale_lock, remove_stale_temp_files
from fsdfm.records.locks import _pid_start
from fsdfm.records.provenance import provenance
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2, "b": [1.5, None]})
    assert json.loads(p.read_text()) == {"a": 2, "b": [1.5, None]}
    assert os.listdir(p.parent) == ["x.json"]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_atomic_write_failure_leaves_old_file_and_no_partial(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "record.json"
    atomic_write(p, b'{"status": "done"}')

    def boom(*a, **k):
        raise OSError(f"simulated crash in {fail_at}")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(p, b'{"status": "do')  # a half record must never become record.json
    monkeypatch.undo()
    assert p.read_bytes() == b'{"status": "done"}'
    assert os.listdir(tmp_path) == ["record.json"]


def test_unserialisable_value_is_named_and_nothing_written(tmp_path):
    p = tmp_path / "r.json"
    with pytest.raises(TypeError, match=r"metrics\.bad has type object"):
        atomic_write_json(p, {"metrics": {"bad": object()}})
    assert not p.exists()


def test_to_jsonable_converts_numpy_and_torch_scalars():
    np = pytest.importorskip("numpy")
    got = to_jsonable({"a": np.float32(0.5), "b": np.arange(3), "c": (1, Path("/x")), "d": np.bool_(True)})
    assert got == {"a": 0.5, "b": [0, 1, 2], "c": [1, "/x"], "d": True}
    assert type(got["a"]) is float


# ---------------------------------------------------------------------------------------------- records
def test_done_iff_record_parses_with_status_done(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    assert not is_done(d)
    (d / RECORD).write_text('{"status": "done", "payload": {')  # half-written
    assert not is_done(d)
    with pytest.warns(UserWarning, match=r"corrupt or half-written record .*record\.json"):
        assert read_record(d) is None
    (d / RECORD).write_text('{"status": "running"}')
    assert not is_done(d)
    (d / RECORD).write_text('["done"]')
    assert not is_done(d)
    (d / RECORD).write_text('{"status": "done"}')
    assert is_done(d)


def test_find_seeds():
    cfg = {"train": {"seed": 1, "lr": 0.1}, "sample": {"sampling_seed": 7, "steps": 8}, "seed": 0, "seeds": [1, 2]}
    assert find_seeds(cfg) == {"train.seed": 1, "sample.sampling_seed": 7, "seed": 0}


def test_provenance_fields():
    p = provenance()
    assert {"git_commit", "git_dirty", "versions", "hostname", "cpu_count", "pid", "slurm_job_id"} <= set(p)
    assert p["cpu_count"] == os.cpu_count()
    assert p["hostname"] == socket.gethostname() and p["pid"] == os.getpid()
    assert p["versions"]["python"].count(".") == 2
    assert p["versions"]["torch"] and p["versions"]["numpy"] and p["versions"]["transformers"]
    commit, dirty = records.git_state()
    # a 40-hex commit inside git, "unknown" (dirty None) outside it or before the first commit
    assert commit == "unknown" or len(commit) == 40
    assert records.git_state(str(Path("/").resolve())) == ("unknown", None)


# ------------------------------------------------------------------------------------------------ locks
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(d: Path, **over) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "job_id": None, "time": "t"}
    info.update(over)
    d.mkdir(parents=True, exist_ok=True)
    (d / LOCK).write_text(json.dumps(info))


def test_lock_is_exclusive_and_released(tmp_path):
    d = tmp_path / "st"
    with stage_lock(d) as me:
        assert me.pid == os.getpid()
        holder, live = lock_holder(d)
        assert live and holder == me
        with pytest.raises(StageLockedError, match=rf"locked by pid {os.getpid()} on"):
            with stage_lock(d):
                pass
    assert not (d / LOCK).exists()


def test_lock_contention_between_processes(tmp_path):
    """Four processes race for one lock: exactly one gets it, the others see who holds it."""
    d, release = tmp_path / "st", tmp_path / "release"
    code = (
        "import os, sys, time; from fsdfm.records import stage_lock, StageLockedError\n"
        "try:\n"
        "    with stage_lock(sys.argv[1]):\n"
        "        print('got', flush=True)\n"
        "        t = time.time()\n"
        "        while not os.path.exists(sys.argv[2]) and time.time() - t < 60: time.sleep(0.02)\n"
        "except StageLockedError as e:\n"
        "    print('busy', e, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(d), str(release)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    deadline = time.time() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.02)  # the winner holds the lock until every loser has tried and given up
    release.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["busy", "busy", "busy", "got"]
    # the losers name the holder, or (caught between its O_EXCL create and its write) say it is being written
    assert all("is locked by" in o for o in outs if o.startswith("busy"))
    assert not (d / LOCK).exists()


def test_stale_lock_of_dead_pid_is_broken(tmp_path):
    d = tmp_path / "st"
    _write_lock(d, pid=_dead_pid())
    holder, live = lock_holder(d)
    assert holder is not None and not live
    with stage_lock(d) as me:
        assert json.loads((d / LOCK).read_text())["pid"] == me.pid == os.getpid()


def test_reused_pid_is_stale(tmp_path):
    d = tmp_path / "st"
    _write_lock(d, pid=os.getpid(), pid_start=1)  # our pid, but a different process start time
    assert lock_holder(d)[1] is False
    _write_lock(d, pid=os.getpid(), pid_start=_pid_start(os.getpid()))
    assert lock_holder(d)[1] is True


def test_other_host_lock_is_live_unless_same_slurm_job(tmp_path, monkeypatch):
    d = tmp_path / "st"
    _write_lock(d, host="node-elsewhere", pid=1, job_id="4242_3")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.raises(StageLockedError, match="pid 1 on node-elsewhere, job 4242_3"):
        with stage_lock(d):
            pass
    # the same SLURM job running again (requeued onto another node): the old attempt is gone
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with stage_lock(d) as me:
        assert me.job_id == "4242_3"


def test_empty_lock_is_live_until_grace_expires(tmp_path):
    d = tmp_path / "st"
    d.mkdir()
    (d / LOCK).write_text("")  # a process between O_EXCL and writing its details
    with pytest.raises(StageLockedError, match="still writing"):
        with stage_lock(d):
            pass
    old = time.time() - records.LOCK_WRITE_GRACE_S - 5
    os.utime(d / LOCK, (old, old))  # ... or one killed right there
    with stage_lock(d):
        pass


def test_release_keeps_a_lock_that_was_retaken(tmp_path):
    d = tmp_path / "st"
    with stage_lock(d):
        _write_lock(d, pid=12345678, host="other")  # someone broke ours and took it
    assert json.loads((d / LOCK).read_text())["host"] == "other"


# ------------------------------------------------------------------------------------------------- load
@stage_kind("t_results_gen")
def _gen(config, inputs, out_dir):
    (out_dir / "samples.txt").write_text(" ".join(str(config["seed"] * i) for i in range(5)))
    return {"metrics": {"n": 5}}


@stage_kind("t_results_score")
def _score(config, inputs, out_dir):
    vals = [int(v) for v in (inputs["samples"] / "samples.txt").read_text().split()]
    return {
        "metrics": {"total": sum(vals) * config["steps"], "curve": vals, "mauve": {"score": 0.5}, "steps": -1},
        "note": "x",
    }


def _study(name: str, seeds=(1, 2), steps=(4, 8)) -> StudyPlan:
    stages, runs = [], []
    for seed in seeds:
        g = Stage("t_results_gen", {"seed": seed})
        for n in steps:
            s = Stage("t_results_score", {"steps": n, "train": {"seed": seed}}, {"samples": g.id})
            stages += [g, s]
            runs.append(
                RunSpec(
                    f"seed{seed}-steps{n}",
                    {"method": "fsdfm", "sampler.steps": n, "train.seed": seed, "steps": n},
                    s.id,
                )
            )
    return StudyPlan.from_stages(name, stages, runs)


def test_load_one_row_per_done_run_with_params_metrics_provenance(tmp_path):
    plan = _study("s1")
    summary = execute(plan, tmp_path, executor="debug")
    assert summary.ok and len(summary.done) == 6
    df = load(tmp_path / "s1")
    assert isinstance(df, pd.DataFrame) and df.shape[0] == 4
    assert list(df.columns[:3]) == ["study", "run_id", "stage_id"]
    assert {
        "method",
        "sampler.steps",
        "train.seed",
        "steps",
        "total",
        "curve",
        "mauve.score",
        "metrics.steps",
        "commit",
        "dirty",
        "device",
        "host",
        "stage_wall_s",
        "end_time",
    } <= set(df.columns)
    row = df.set_index("run_id").loc["seed2-steps8"]
    assert row["total"] == sum(2 * i for i in range(5)) * 8 and row["curve"] == [0, 2, 4, 6, 8]
    assert row["steps"] == 8 and row["metrics.steps"] == -1  # a metric may not shadow a parameter
    assert row["device"] == "cpu" and row["stage_wall_s"] >= 0
    from fsdfm.launch.runtime import malloc_tuned  # run_stage tuned malloc in this (debug-executor) process

    assert all(r["provenance"]["malloc_tuned"] is malloc_tuned() is not None for r in records.load_records(tmp_path))
    # the groupby the design promises
    mean = df.groupby(["method", "sampler.steps"]).total.mean()
    assert mean.loc[("fsdfm", 4)] == pytest.approx((10 * 4 + 20 * 4) / 2)


def test_load_root_with_many_studies_and_skips_unfinished(tmp_path):
    execute(_study("a"), tmp_path, executor="debug")
    plan_b = _study("b", seeds=(3,))
    execute(plan_b, tmp_path, executor="debug")
    # one run of b loses its record: not done, so no row (and no warning: nothing is corrupt)
    os.unlink(stage_dir(tmp_path / "b", plan_b.runs[0].stage_id) / RECORD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = load(tmp_path)
    assert sorted(df.study.unique()) == ["a", "b"] and len(df) == 4 + 1


def test_corrupt_record_is_skipped_with_a_warning_naming_the_file(tmp_path):
    plan = _study("s")
    execute(plan, tmp_path, executor="debug")
    bad = stage_dir(tmp_path / "s", plan.runs[1].stage_id) / RECORD
    bad.write_text(bad.read_text()[:40])  # truncated mid-write (as a non-atomic writer would leave it)
    with pytest.warns(UserWarning, match=str(bad)):
        df = load(tmp_path / "s")
    assert len(df) == 3 and plan.runs[1].run_id not in set(df.run_id)
    with pytest.warns(UserWarning, match=str(bad)):
        recs = load_records(tmp_path, kind="t_results_score")
    assert len(recs) == 3


def test_load_empty_and_missing(tmp_path):
    df = load(tmp_path)
    assert df.empty and list(df.columns[:3]) == ["study", "run_id", "stage_id"]
    with pytest.raises(FileNotFoundError, match="no results"):
        load(tmp_path / "nope")


def test_load_records_per_stage_view(tmp_path):
    plan = _study("s")
    execute(plan, tmp_path, executor="debug")
    gens = load_records(tmp_path / "s", kind="t_results_gen")
    assert len(gens) == 2 and all(r["kind"] == "t_results_gen" and r["study"] == "s" for r in gens)
    everything = load_records(tmp_path)
    assert len(everything) == 6
    r = next(r for r in everything if r["kind"] == "t_results_score")
    assert r["status"] == "done" and r["inputs"]["samples"].startswith("t_results_gen-")
    assert r["seeds"] == {"train.seed": r["config"]["train"]["seed"]}
    assert r["payload"]["note"] == "x"
    prov = r["provenance"]
    for key in (
        "git_commit",
        "git_dirty",
        "versions",
        "device",
        "hostname",
        "start_time",
        "end_time",
        "wall_s",
        "slurm_job_id",
        "attempt",
    ):
        assert key in prov
    assert Path(r["stage_dir"], "record.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temp_files_of_dead_writers_only(tmp_path):
    """Temp files of killed writers go (any depth, both naming schemes); live writers' and other files stay."""
    dead = _dead_pid()
    (tmp_path / "ckpt").mkdir()
    stale = [
        tmp_path / "ckpt" / f".checkpoint.pt.{dead}.tmp",
        tmp_path / f".record.json.{dead}.0123abcd.tmp",
        tmp_path / f".x.{2**40}.tmp",
    ]  # a pid no kernel hands out
    live = tmp_path / "ckpt" / f".checkpoint.pt.{os.getpid()}.tmp"
    others = [
        tmp_path / "ckpt" / "checkpoint.pt",
        tmp_path / "notes.tmp",
        tmp_path / ".hidden.tmp",
        tmp_path / f"checkpoint.pt.{dead}.tmp",
    ]
    for p in stale + [live] + others:
        p.write_bytes(b"")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in [live] + others) and not any(p.exists() for p in stale)


def test_break_stale_lock_only_breaks_dead_holders(tmp_path):
    sdir = tmp_path / "s"
    with stage_lock(sdir):
        assert not break_stale_lock(sdir) and lock_holder(sdir)[1]  # our own, live
    assert not break_stale_lock(sdir)  # no lock at all
    info = LockInfo(host=socket.gethostname(), pid=_dead_pid(), pid_start=None, job_id=None, time="t")
    (sdir / LOCK).write_text(json.dumps(info.__dict__))
    assert lock_holder(sdir) == (info, False)
    assert break_stale_lock(sdir) and not (sdir / LOCK).exists()


def test_stage_lock_waits_for_a_live_holder(tmp_path):
    """wait=True: told once who holds it, then taken as soon as the holder lets go."""
    sdir = tmp_path / "s"
    code = (
        "import sys, time; from pathlib import Path; from fsdfm.records import stage_lock\n"
        "with stage_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout.readline().strip() == "held"
    told = []

    def tell(holder):
        told.append(holder.pid)
        proc.stdin.write("\n")  # the holder releases after we started waiting
        proc.stdin.flush()

    with stage_lock(sdir, wait=True, poll_s=0.05, on_wait=tell) as me:
        assert lock_holder(sdir)[0] == me
    assert told == [proc.pid] and proc.wait(timeout=30) == 0


# ------------------------------------------------------------------------------------------- artefacts
def _stage_with_artefacts(d: Path) -> dict:
    """A done stage folder with artefacts at two depths, a checkpoint, a log and control files."""
    (d / "sub").mkdir(parents=True)
    (d / "ckpt").mkdir()
    (d / "model.pt").write_bytes(b"weights" * 100)
    (d / "sub" / "per_sample.csv").write_text("i,nll\n0,1.5\n")  # an artefact nobody declared
    (d / "ckpt" / "checkpoint.pt").write_bytes(b"resume state")
    (d / "train.log").write_text("step 1\n")
    (d / ".model.pt.123.tmp").write_bytes(b"")
    (d / records.ERROR).write_text("{}")
    manifest = records.artefact_manifest(d)
    atomic_write_json(d / RECORD, {"status": "done", "artefacts": manifest, "inputs": {}})
    return manifest


def test_manifest_covers_every_artefact_and_only_artefacts(tmp_path):
    import hashlib

    d = tmp_path / "stage"
    manifest = _stage_with_artefacts(d)
    assert set(manifest) == {"model.pt", "sub/per_sample.csv"}
    assert manifest["model.pt"] == {"size": 700, "sha256": hashlib.sha256(b"weights" * 100).hexdigest()}
    check = records.check_stage(d)
    assert check.done and check.verified and not check.problems


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:350]), "350 bytes, recorded 700"),
        (lambda p: p.write_bytes(b"W" + p.read_bytes()[1:]), "same size: overwritten"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_a_damaged_artefact_makes_the_stage_not_done_naming_the_file(tmp_path, damage, words):
    d = tmp_path / "stage"
    _stage_with_artefacts(d)
    damage(d / "model.pt")
    check = records.check_stage(d)
    assert check.state == "damaged" and not is_done(d)
    [problem] = check.problems
    assert problem.startswith(str(d / "model.pt")) and words in problem
    assert check.damaged_files == (str(d / "model.pt"),)


def test_damaged_checkpoints_and_logs_do_not_undo_a_finished_stage(tmp_path):
    d = tmp_path / "stage"
    _stage_with_artefacts(d)
    (d / "ckpt" / "checkpoint.pt").write_bytes(b"")
    (d / "train.log").write_text("rotated")
    assert is_done(d)


def test_a_stage_whose_input_was_redone_is_stale(tmp_path):
    a, b = tmp_path / "a-1", tmp_path / "b-1"
    _stage_with_artefacts(a)
    b.mkdir()
    atomic_write_json(
        b / RECORD,
        {"status": "done", "artefacts": {}, "inputs": {"x": "a-1"}, "input_records": {"x": records.record_digest(a)}},
    )
    assert is_done(b)
    atomic_write_json(a / RECORD, {**read_record(a), "end_time": "later"})  # a was redone
    check = records.check_stage(b)
    assert check.state == "stale" and str(a / RECORD) in check.problems[0] and "'x'" in check.problems[0]


def test_sha256_file_sees_a_rewrite_within_one_process(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 10)
    assert sha256_file(p) == hashlib.sha256(b"a" * 10).hexdigest()
    atomic_write(p, b"b" * 10)  # same size; os.replace gives a new inode even within one mtime tick
    assert sha256_file(p) == hashlib.sha256(b"b" * 10).hexdigest()
