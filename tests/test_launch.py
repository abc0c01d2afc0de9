"""Executing study plans: run_stage, the debug and local executors, skips, failures, kill -9, locks, status.

The stage kinds below are small and real: they add numbers, write artefacts, read their inputs' artefacts and
log every call to a counter file (FSDFM_TEST_COUNTER), so a test can tell exactly which stages ran. Job
processes (local executor, subprocesses) import this module by name to find them (plan.json records it).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fsdfm import launch
from fsdfm.launch import (
    StageInputError,
    execute,
    load_profile,
    resources_for,
    run_stage,
    status,
    write_plan,
)
from fsdfm.registry import UnknownNameError
from fsdfm.io import atomic_write_json, read_json
from fsdfm.records import (
    ATTEMPTS,
    ERROR,
    PLAN,
    RECORD,
    RUNNING,
    SUBMITTED,
    StageLockedError,
    is_done,
    lock_holder,
    pid_alive,
    stage_dir,
    stage_lock,
)
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _count(out_dir: Path) -> None:
    counter = os.environ.get("FSDFM_TEST_COUNTER")
    if counter:
        with open(counter, "a") as f:  # O_APPEND: one line per call, from any process
            f.write(out_dir.name + "\n")


def calls(counter: Path) -> dict:
    out: dict = {}
    if counter.exists():
        for line in counter.read_text().split():
            out[line] = out.get(line, 0) + 1
    return out


def _hold() -> None:
    """Block while the file named by FSDFM_TEST_HOLD exists (lets a test catch a stage mid-run)."""
    hold = os.environ.get("FSDFM_TEST_HOLD")
    deadline = time.time() + 60
    while hold and os.path.exists(hold) and time.time() < deadline:
        time.sleep(0.05)


@stage_kind("t_launch_const")
def const_stage(config, inputs, out_dir):
    _count(out_dir)
    (out_dir / "value.txt").write_text(str(config["value"]))
    return {"metrics": {"value": config["value"]}}


@stage_kind("t_launch_add")
def add_stage(config, inputs, out_dir):
    """value = sum of the inputs' value.txt + config["add"]; also writes a small artefact directory."""
    _count(out_dir)
    total = sum(int((d / "value.txt").read_text()) for d in inputs.values()) + config["add"]
    (out_dir / "parts").mkdir(exist_ok=True)
    for name, d in sorted(inputs.items()):
        (out_dir / "parts" / f"{name}.txt").write_text((d / "value.txt").read_text())
    if config.get("hold"):
        _hold()
    if config.get("fail"):
        raise ValueError(f"add stage refuses total {total}")
    (out_dir / "value.txt").write_text(str(total))
    return {"metrics": {"value": total, "n_inputs": len(inputs)}}


@stage_kind("t_launch_bad_return")
def bad_return_stage(config, inputs, out_dir):
    return [1, 2]


@stage_kind("t_launch_resume", checkpointable=True)
def resume_stage(config, inputs, out_dir):
    """Checkpointable: keeps what earlier attempts left in out_dir (here: a list of attempt marks)."""
    marks = out_dir / "marks.txt"
    n = len(marks.read_text().split()) if marks.exists() else 0
    marks.write_text("x " * (n + 1))
    if n + 1 < config["attempts"]:
        raise RuntimeError(f"attempt {n + 1} interrupted")
    return {"metrics": {"attempts_seen": n + 1}}


@stage_kind("t_launch_fit", checkpointable=True)
def fit_stage(config, inputs, out_dir):
    """Real training (fsdfm.train.fit) of a tiny embedding with a checkpoint every step; `sleep_s` per step leaves
    a test time to interrupt it mid-training."""
    import torch

    from fsdfm.train import OptimConfig, fit

    _count(out_dir)
    torch.manual_seed(0)
    model = torch.nn.Embedding(8, 2)
    data = torch.arange(64).remainder(8).reshape(16, 4)

    def loss_fn(ctx):
        time.sleep(config["sleep_s"])
        return (ctx.model(ctx.batch) - ctx.batch.unsqueeze(-1).float() / 8).pow(2).mean()

    res = fit(
        model,
        loss_fn,
        data,
        OptimConfig(steps=config["steps"], batch_size=4, lr=0.05, warmup_steps=2, ckpt_every=1, seed=1),
        ckpt_dir=out_dir / "ckpt",
        device="cpu",
        progress=False,
    )
    return {
        "metrics": {"final_loss": res.losses[-1]},
        "resumed_from": res.resumed_from,
        "losses": res.losses,
        "weight": model.weight.tolist(),
    }


# ------------------------------------------------------------------------------------------------ plans
def chain_plan(
    name: str = "chain", base: int = 1, add_b: int = 10, add_c: int = 100, hold_b: bool = False, fail_b: bool = False
) -> StudyPlan:
    """a(const) -> b(add) -> c(add, also reads a); d(const) independent; runs end in c and d."""
    a = Stage("t_launch_const", {"value": base})
    b_cfg = {"add": add_b, **({"hold": True} if hold_b else {}), **({"fail": True} if fail_b else {})}
    b = Stage("t_launch_add", b_cfg, {"x": a.id})
    c = Stage("t_launch_add", {"add": add_c}, {"x": b.id, "y": a.id})
    d = Stage("t_launch_const", {"value": 7, "seed": 3})
    runs = [RunSpec("main", {"method": "chain", "model.add": add_c}, c.id), RunSpec("side", {"method": "const"}, d.id)]
    return StudyPlan.from_stages(name, [a, b, c, d], runs)


def ids(plan: StudyPlan) -> list[str]:
    return list(plan.stages)


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "calls.log"
    monkeypatch.setenv("FSDFM_TEST_COUNTER", str(path))
    # job processes import this module by name: make the repo and tests/ importable for them too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS)]))
    return path


def payloads(study: Path, plan: StudyPlan) -> dict:
    return {sid: read_json(stage_dir(study, sid) / RECORD)["payload"] for sid in plan.stages}


def artefacts(study: Path, sid: str) -> dict:
    d = stage_dir(study, sid)
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
    }


# ---------------------------------------------------------------------------------------------- debug
def test_debug_runs_waves_and_writes_records(tmp_path, counter):
    plan = chain_plan()
    a, b, c, d = ids(plan)
    s = execute(plan, tmp_path, executor="debug")
    assert s.ok and set(s.done) == {a, b, c, d} and not s.skipped
    study = tmp_path / "chain"
    assert read_json(study / PLAN)["stages"][c]["inputs"] == {"x": b, "y": a}
    p = payloads(study, plan)
    assert p[c]["metrics"] == {"value": (1 + 10) + 1 + 100, "n_inputs": 2}
    assert artefacts(study, c) == {"parts/x.txt": b"11", "parts/y.txt": b"1", "value.txt": b"112"}
    rec = read_json(stage_dir(study, d) / RECORD)
    assert rec["status"] == "done" and rec["stage_id"] == d and rec["seeds"] == {"seed": 3}
    assert rec["provenance"]["attempt"] == 1 and rec["provenance"]["job_id"] is None
    for marker in (RUNNING, ERROR, ".lock"):
        assert not (stage_dir(study, c) / marker).exists()


def test_done_stages_are_skipped_not_rerun(tmp_path, counter):
    plan = chain_plan()
    execute(plan, tmp_path, executor="debug")
    again = execute(plan, tmp_path, executor="debug")
    assert set(again.skipped) == set(plan.stages) and not again.done
    assert calls(counter) == {sid: 1 for sid in plan.stages}
    assert run_stage(tmp_path / "chain", ids(plan)[2])["status"] == "done"  # a direct call returns the record
    assert calls(counter) == {sid: 1 for sid in plan.stages}


def test_changed_setting_reruns_exactly_what_it_affects(tmp_path, counter):
    old = chain_plan()
    execute(old, tmp_path, executor="debug")
    new = chain_plan(add_b=20)  # b changes, so c changes; a and d are the same stages
    a, b, c, d = ids(new)
    s = execute(new, tmp_path, executor="debug")
    assert set(s.skipped) == {a, d} and set(s.done) == {b, c}
    n = calls(counter)
    assert n[a] == n[d] == 1 and n[b] == n[c] == 1 and len(n) == 6
    assert payloads(tmp_path / "chain", new)[c]["metrics"]["value"] == (1 + 20) + 1 + 100


def test_failure_writes_error_and_blocks_only_dependents(tmp_path, counter):
    plan = chain_plan(fail_b=True)
    a, b, c, d = ids(plan)
    s = execute(plan, tmp_path, executor="debug")
    assert set(s.done) == {a, d} and list(s.failed) == [b] and s.blocked == (c,) and not s.ok
    assert s.failed[b] == "ValueError: add stage refuses total 11"
    err = read_json(stage_dir(tmp_path / "chain", b) / ERROR)
    assert err["type"] == "ValueError" and err["message"] == "add stage refuses total 11"
    assert err["traceback_tail"][-1] == "ValueError: add stage refuses total 11"
    assert any("add_stage" in ln for ln in err["traceback_tail"])
    assert not (stage_dir(tmp_path / "chain", b) / RECORD).exists()
    rep = status(tmp_path / "chain")
    assert rep.counts() == {"done": 2, "running": 0, "failed": 1, "blocked": 1, "pending": 0} and rep.runs_done == 1
    assert {x.stage_id: x.detail for x in rep.stages}[c] == f"input {b} failed"
    text = rep.format()
    assert "ValueError: add stage refuses total 11" in text and "| ValueError" in text
    with pytest.raises(StageInputError, match=f"input 'x' \\(stage {b}\\) is not done"):
        run_stage(tmp_path / "chain", c)


def test_bad_return_and_unknown_kind(tmp_path, counter):
    st = Stage("t_launch_bad_return", {})
    s = execute(StudyPlan.from_stages("bad", [st]), tmp_path, executor="debug")
    assert "returned list" in s.failed[st.id]
    typo = StudyPlan.from_stages("typo", [Stage("t_launch_constt", {"value": 1})])
    with pytest.raises(UnknownNameError, match="did you mean 't_launch_const'"):
        execute(typo, tmp_path, executor="debug")
    assert not (tmp_path / "typo").exists()  # nothing written before the plan is known to be runnable
    with pytest.raises(UnknownNameError, match="unknown executor 'lokal'.*did you mean 'local'"):
        execute(chain_plan(), tmp_path, executor="lokal")
    with pytest.raises(ValueError, match="wait=False"):
        execute(chain_plan(), tmp_path, executor="local", wait=False)


def test_non_checkpointable_out_dir_is_cleared_checkpointable_kept(tmp_path, counter):
    plan = chain_plan()
    a = ids(plan)[0]
    write_plan(plan, tmp_path)
    junk = stage_dir(tmp_path / "chain", a) / "junk"
    junk.mkdir(parents=True)
    (junk / "half.bin").write_bytes(b"\0" * 10)  # left by a killed attempt
    run_stage(tmp_path / "chain", a)
    assert not junk.exists()
    # a checkpointable stage finds what its earlier attempts left (the function decides how to resume)
    st = Stage("t_launch_resume", {"attempts": 3})
    rplan = StudyPlan.from_stages("resume", [st])
    for k in (1, 2):
        s = execute(rplan, tmp_path, executor="debug")
        assert s.failed[st.id] == f"RuntimeError: attempt {k} interrupted"
    s = execute(rplan, tmp_path, executor="debug")
    rec = read_json(stage_dir(tmp_path / "resume", st.id) / RECORD)
    assert s.ok and rec["payload"]["metrics"]["attempts_seen"] == 3 and rec["provenance"]["attempt"] == 3
    assert (stage_dir(tmp_path / "resume", st.id) / ATTEMPTS).read_text().strip() == "3"


# ---------------------------------------------------------------------------------------------- local
def test_local_executor_reports_failures(tmp_path, counter):
    bad = Stage("t_launch_add", {"add": 5, "fail": True})
    after = Stage("t_launch_add", {"add": 1}, {"x": bad.id})
    s = execute(StudyPlan.from_stages("fails", [bad, after]), tmp_path, executor="local", poll_s=0.1)
    assert s.failed == {bad.id: "ValueError: add stage refuses total 5"} and s.blocked == (after.id,)
    assert list(s.submitted) == [bad.id]  # the blocked stage was never submitted
    assert status(tmp_path / "fails").by_state("failed")[0].error_tail[-1] == "ValueError: add stage refuses total 5"


def test_local_executor_starts_a_stage_once_its_inputs_are_done_not_when_its_wave_ends(tmp_path, counter, monkeypatch):
    """A long stage h (held) beside a -> b -> c: with two slots, b and c run while h still runs (wave by wave, b
    would wait for h, the other stage of the first wave)."""
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv("FSDFM_TEST_HOLD", str(hold))  # local jobs inherit the driver's environment
    a = Stage("t_launch_const", {"value": 1})
    h = Stage("t_launch_add", {"add": 0, "hold": True})
    b = Stage("t_launch_add", {"add": 10}, {"x": a.id})
    c = Stage("t_launch_add", {"add": 100}, {"x": b.id})
    plan = StudyPlan.from_stages("ready", [a, h, b, c])
    out: dict = {}
    driver = threading.Thread(
        target=lambda: out.update(s=execute(plan, tmp_path, executor="local", max_parallel=2, poll_s=0.1))
    )
    driver.start()
    try:
        deadline = time.time() + 50  # _hold gives up after 60 s
        while not is_done(stage_dir(tmp_path / "ready", c.id)):
            assert driver.is_alive() and time.time() < deadline, "c did not finish while h was held"
            time.sleep(0.05)
        assert not is_done(stage_dir(tmp_path / "ready", h.id))  # h is still held: c did not wait for it
    finally:
        hold.unlink()
        driver.join(timeout=60)
    s = out["s"]
    assert s.ok and set(s.done) == {a.id, h.id, b.id, c.id}
    assert payloads(tmp_path / "ready", plan)[c.id]["metrics"]["value"] == 1 + 10 + 100


@pytest.mark.slow
def test_local_executor_prints_each_stage_as_it_starts_and_ends_and_status_names_the_log(tmp_path, counter, capsys):
    good, bad = Stage("t_launch_const", {"value": 2}), Stage("t_launch_add", {"add": 5, "fail": True})
    execute(StudyPlan.from_stages("progress", [good, bad]), tmp_path, executor="local", poll_s=0.1)
    err = capsys.readouterr().err
    assert f"{good.id} started (local job" in err and f"{bad.id} started (local job" in err
    assert f"{good.id} done in " in err and f"{bad.id} FAILED: ValueError: add stage refuses total 5" in err
    failed = status(tmp_path / "progress").by_state("failed")[0]
    log = Path(failed.detail.split("; log ")[1])
    assert log.is_file() and "add stage refuses total 5" in log.read_text()


def test_kill9_midway_then_rerun_gives_identical_results(tmp_path, counter):
    """A local run is SIGKILLed (with its job processes) while stage b runs; the local re-run skips a, reruns b
    from a clean slate and ends with the records and artefacts of an uninterrupted run."""
    hold = tmp_path / "hold"
    hold.touch()
    plan = chain_plan(hold_b=True)
    a, b, c, d = ids(plan)
    root = tmp_path / "killed"
    code = (
        "import sys, test_launch as t\n"
        "from fsdfm.launch import execute\n"
        "execute(t.chain_plan(hold_b=True), sys.argv[1], executor='local', max_parallel=2, poll_s=0.1)\n"
    )
    env = {**os.environ, "FSDFM_TEST_HOLD": str(hold)}
    with open(tmp_path / "driver.log", "w") as log:
        # a session of its own: killpg takes the driver, submitit's controllers and the job processes at once
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(root)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    bdir = stage_dir(root / "chain", b)
    deadline = time.time() + 60
    while not ((bdir / RUNNING).exists() and lock_holder(bdir)[1]):
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()
        assert time.time() < deadline, "stage b never started"
        time.sleep(0.05)
    assert status(root / "chain").by_state("running")[0].stage_id == b
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    holder, live = lock_holder(bdir)
    deadline = time.time() + 10
    while live and time.time() < deadline:  # the job process dies with its group; give the kernel a moment
        time.sleep(0.05)
        holder, live = lock_holder(bdir)
    assert holder is not None and not live  # a stale lock was left behind ...
    assert is_done(stage_dir(root / "chain", a)) and not is_done(bdir) and not (bdir / RECORD).exists()
    st = {s.stage_id: s for s in status(root / "chain").stages}
    # killed without writing error.json: a failure all the same (issue 23), naming the process and the job's log
    assert st[b].state == "failed" and "died without an error report" in st[b].detail, st[b]
    assert "interrupted" not in st[b].detail and "; log " in st[b].detail and st[c].state == "blocked"

    hold.unlink()
    s = execute(plan, root, executor="local", max_parallel=2, poll_s=0.1)  # ... and is broken by the re-run
    assert a in s.skipped and b in s.done and c in s.done and s.ok
    n = calls(counter)
    assert n[a] == 1 and n[b] == 2 and n[c] == 1  # a was not re-run; b ran again from a clean slate

    # identical to an uninterrupted in-process run
    execute(plan, tmp_path / "clean", executor="debug")
    assert payloads(root / "chain", plan) == payloads(tmp_path / "clean" / "chain", plan)
    for sid in (b, c):
        assert artefacts(root / "chain", sid) == artefacts(tmp_path / "clean" / "chain", sid)
    rec = read_json(bdir / RECORD)
    assert rec["provenance"]["attempt"] == 2
    assert rec["provenance"]["job_id"] == s.submitted[b] and rec["provenance"]["pid"] != os.getpid()
    again = execute(plan, root, executor="local")
    assert set(again.skipped) == set(plan.stages) and not again.submitted  # done stages are not submitted


def test_same_stage_in_two_processes_does_not_clobber(tmp_path, counter, capfd):
    """While one process runs stage b, a second run_stage of b says who holds it (the pid) and waits; once the
    first is done the second returns its record instead of recomputing it."""
    hold = tmp_path / "hold"
    hold.touch()
    plan = chain_plan(hold_b=True)
    a, b, c, d = ids(plan)
    study = write_plan(plan, tmp_path)
    run_stage(study, a)
    code = "import sys, test_launch; from fsdfm.launch import run_stage; run_stage(sys.argv[1], sys.argv[2])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(study), b], cwd=ROOT, env={**os.environ, "FSDFM_TEST_HOLD": str(hold)}
    )
    bdir = stage_dir(study, b)
    deadline = time.time() + 30
    while not lock_holder(bdir)[1]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    with pytest.raises(StageLockedError, match=f"stage {b} is locked by pid {proc.pid}"):
        with stage_lock(bdir):  # without wait=True a live holder is refused at once
            pass
    running = status(study).by_state("running")
    assert [r.stage_id for r in running] == [b] and f"pid {proc.pid}" in running[0].detail
    releaser = threading.Timer(1.0, hold.unlink)  # the holder finishes while we wait
    releaser.start()
    rec = run_stage(study, b)  # waits for the other process; its record is returned, not recomputed
    releaser.join()
    assert proc.wait(timeout=30) == 0
    assert rec["provenance"]["pid"] == proc.pid
    assert calls(counter)[b] == 1
    err = capfd.readouterr().err
    assert f"stage {b} is locked by pid {proc.pid}" in err and "waiting for it to finish" in err


def test_stage_start_removes_temp_files_of_killed_writers(tmp_path, counter):
    """A kill during a checkpoint write leaves an empty `.checkpoint.pt.<pid>.tmp`: the next attempt removes it
    and keeps the checkpoints (a checkpointable stage resumes from them)."""
    st = Stage("t_launch_resume", {"attempts": 1})
    study = write_plan(StudyPlan.from_stages("tmp", [st]), tmp_path)
    out = stage_dir(study, st.id)
    (out / "ckpt").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    litter = [out / "ckpt" / f".checkpoint.pt.{dead.pid}.tmp", out / f".running.json.{dead.pid}.89abcdef.tmp"]
    for p in litter:
        p.write_bytes(b"")
    (out / "ckpt" / "checkpoint.pt").write_bytes(b"kept")
    assert run_stage(study, st.id)["payload"]["metrics"]["attempts_seen"] == 1
    assert not any(p.exists() for p in litter) and (out / "ckpt" / "checkpoint.pt").read_bytes() == b"kept"


def test_a_job_imports_only_fsdfm_modules_or_those_its_driver_granted(tmp_path, counter):
    """plan.json names the module of each kind; a job imports it only if it is part of fsdfm or granted by the
    driver (FSDFM_STAGE_MODULES), so an edited plan.json cannot make a job run another module."""
    plan = chain_plan()
    a = ids(plan)[0]
    study = write_plan(plan, tmp_path)
    grant = launch.stage_modules_env(["t_launch_const"])
    assert grant == {"test_launch": str(TESTS)}
    code = "import sys; from fsdfm.launch import run_stage; run_stage(sys.argv[1], sys.argv[2])"

    def job(**env):
        # PYTHONPATH holds tests/ too: the module *could* be imported, the grant decides
        return subprocess.run(
            [sys.executable, "-c", code, str(study), a],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**{k: v for k, v in os.environ.items() if k != launch.STAGE_MODULES_ENV}, **env},
            timeout=120,
        )

    refused = job()
    assert refused.returncode != 0 and "module 'test_launch', which is not part of the fsdfm package" in refused.stderr
    evil = tmp_path / "evil_stage_module.py"
    evil.write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    tampered = read_json(study / PLAN)
    tampered["kinds"]["t_launch_const"] = {"module": "evil_stage_module", "import_root": str(tmp_path)}
    (study / PLAN).write_text(json.dumps(tampered))
    refused = job(**{launch.STAGE_MODULES_ENV: json.dumps(grant)})
    assert refused.returncode != 0 and "'evil_stage_module', which is not part of" in refused.stderr
    assert not (tmp_path / "pwned").exists()
    write_plan(plan, tmp_path)
    ok = job(**{launch.STAGE_MODULES_ENV: json.dumps(grant)})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert is_done(stage_dir(study, a))


def test_a_plan_written_before_the_refactor_still_finds_its_kinds(tmp_path):
    """A plan.json of a study planned before issue 12 names "fsdfm.pipeline" (gone) as the module of every method
    and evaluation stage kind: a fresh job falls back to the modules that register fsdfm's kinds now."""
    old_hints = {"train_dfm": "fsdfm.pipeline", "sample": "fsdfm.pipeline", "evaluate_external": "fsdfm.external"}
    kinds = {
        kind: {"module": module, "checkpointable": False, "resources": "cpu"} for kind, module in old_hints.items()
    }
    atomic_write_json(tmp_path / PLAN, {"name": "old", "kinds": kinds, "stages": {}, "runs": []})
    code = (
        "import json, sys\n"
        "from fsdfm.launch import resolve_kind\n"
        "from fsdfm.records import read_plan\n"
        "assert 'fsdfm.methods' not in sys.modules  # a job starts with fsdfm.launch only\n"
        "hints = read_plan(sys.argv[1])['kinds']\n"
        "print(json.dumps({kind: resolve_kind(kind, hint).module for kind, hint in hints.items()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != launch.STAGE_MODULES_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "train_dfm": "fsdfm.methods.dfm",
        "sample": "fsdfm.methods.evaluate",
        "evaluate_external": "fsdfm.external",
    }


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the job processes of a study name its folder)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text in cmd and state not in ("Z", "X"):
                out.append(int(entry))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm"])  # "ctrl-c" passes too; left out to keep the suite short
def test_sigterm_to_a_local_driver_stops_its_jobs_and_the_rerun_resumes(tmp_path, counter, monkeypatch, how):
    """SIGTERM to the driver alone (as `kill PID` sends it), or Ctrl-C (SIGINT to its whole process group, jobs
    included), mid-training: the driver cancels its job, no job process and no
    lock outlive it; the re-run resumes from the last checkpoint and ends with the weights and losses of an
    uninterrupted run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # 10 s of training: under load (a study on the same 2 cores) 2 s were over before the SIGTERM reached the job
    cfg = {"steps": 200, "sleep_s": 0.05}
    st = Stage("t_launch_fit", cfg)
    plan = StudyPlan.from_stages("sig", [st])
    root = tmp_path / "run"
    code = (
        "import sys, test_launch as t\n"
        "from fsdfm.launch import execute\n"
        "from fsdfm.study.graph import Stage, StudyPlan\n"
        f"execute(StudyPlan.from_stages('sig', [Stage('t_launch_fit', {cfg!r})]), sys.argv[1], executor='local',"
        " poll_s=0.1)\n"
    )
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(root)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # a process group of its own, as a terminal gives it
    sdir = stage_dir(root / "sig", st.id)
    deadline = time.time() + 90
    while not ((sdir / "ckpt" / "checkpoint.pt").exists() and lock_holder(sdir)[1]):  # training, checkpointed
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()
        assert time.time() < deadline, "training never started"
        time.sleep(0.05)
    job_pid = lock_holder(sdir)[0].pid
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    log = (tmp_path / "driver.log").read_text()
    assert ("interrupted by SIGTERM" if how == "sigterm" else "KeyboardInterrupt") in log
    assert not pid_alive(job_pid) and _processes_mentioning(str(root)) == []
    assert not (sdir / ".lock").exists() and not (sdir / RUNNING).exists() and not is_done(sdir)
    step = torch_load_step(sdir / "ckpt" / "checkpoint.pt")
    assert 0 < step < cfg["steps"]

    s = execute(plan, root, executor="local", poll_s=0.1)
    assert s.ok and s.done == (st.id,)
    rec = read_json(sdir / RECORD)["payload"]
    assert rec["resumed_from"] >= step  # resumed from the checkpoint, not from scratch
    clean = execute(plan, tmp_path / "clean", executor="debug")
    assert clean.ok
    ref = read_json(stage_dir(tmp_path / "clean" / "sig", st.id) / RECORD)["payload"]
    assert ref["resumed_from"] == 0
    assert rec["weight"] == ref["weight"] and rec["losses"] == ref["losses"]


@stage_kind("t_launch_signal_self")
def signal_self_stage(config, inputs, out_dir):
    """Sends its own process a signal mid-stage, as `kill` on an inline driver would."""
    (out_dir / "started").write_text("1")
    os.kill(os.getpid(), config["signal"])
    time.sleep(5)  # the handler raises before this ends
    return {"metrics": {}}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_an_inline_driver_unwinds_the_stage(tmp_path, counter, sig):
    """In the driver's own process: the signal becomes DriverInterrupted (a KeyboardInterrupt), the stage
    unwinds (no lock, no running.json, no error.json: it did not fail), and the old handlers are back."""
    st = Stage("t_launch_signal_self", {"signal": int(sig)})
    before = signal.getsignal(sig)
    with pytest.raises(launch.DriverInterrupted, match=f"interrupted by {signal.Signals(sig).name}") as e:
        execute(StudyPlan.from_stages("selfsig", [st]), tmp_path, executor="inline")
    assert isinstance(e.value, KeyboardInterrupt) and e.value.signum == sig
    out = stage_dir(tmp_path / "selfsig", st.id)
    assert (out / "started").exists() and not any((out / f).exists() for f in (".lock", RUNNING, ERROR, RECORD))
    assert signal.getsignal(sig) is before


def torch_load_step(path: Path) -> int:
    import torch

    return int(torch.load(path, weights_only=True)["step"])


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inline", "local"])
def test_two_concurrent_runs_of_a_study_both_succeed(tmp_path, counter, executor):
    """The second run finds stage b locked by the first, says so (naming the pid) and waits; both runs exit 0
    and every stage ran once."""
    hold = tmp_path / "hold"
    hold.touch()
    plan = chain_plan(hold_b=True)
    a, b, c, d = ids(plan)
    root = tmp_path / "res"
    code = (
        "import sys, test_launch as t\n"
        "from fsdfm.launch import execute\n"
        f"s = execute(t.chain_plan(hold_b=True), sys.argv[1], executor={executor!r}, poll_s=0.1)\n"
        "print(s.format()); sys.exit(0 if s.ok else 1)\n"
    )
    env = {**os.environ, "FSDFM_TEST_HOLD": str(hold)}

    def driver(name):
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(
            [sys.executable, "-c", code, str(root)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        ), tmp_path / f"{name}.log"

    first, first_log = driver("first")
    bdir = stage_dir(root / "chain", b)
    deadline = time.time() + 90
    info, live = lock_holder(bdir)
    while not (live and info is not None):  # one read: the holder and its liveness from the same lock file
        assert first.poll() is None and time.time() < deadline, first_log.read_text()
        time.sleep(0.05)
        info, live = lock_holder(bdir)
    holder = info.pid
    second, second_log = driver("second")
    while f"stage {b} is locked by pid {holder}" not in second_log.read_text():
        assert second.poll() is None and time.time() < deadline, second_log.read_text()
        time.sleep(0.05)
    hold.unlink()
    assert first.wait(timeout=120) == 0, first_log.read_text()
    assert second.wait(timeout=120) == 0, second_log.read_text()
    assert calls(counter) == {a: 1, b: 1, c: 1, d: 1}
    assert all(is_done(stage_dir(root / "chain", sid)) for sid in plan.stages)


# ------------------------------------------------------------------------------------- status + scheduler
def _fake_scheduler(tmp_path: Path, monkeypatch, sacct_lines: list[str]) -> None:
    """sacct/squeue on PATH that answer with `sacct_lines` ("JOBID|STATE"), as the real ones print them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(sacct_lines) + "\nEOF\n")
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _submitted(study: Path, sid: str, job_id: str, age_s: float) -> None:
    atomic_write_json(
        stage_dir(study, sid) / SUBMITTED,
        {
            "executor": "slurm",
            "job_id": job_id,
            "time": "t",
            "time_unix": time.time() - age_s,
            "stdout": "",
            "stderr": "",
        },
    )


def test_status_asks_the_scheduler_about_submitted_jobs(tmp_path, monkeypatch):
    """A cancelled job is failed with its state, the stages behind it blocked, a job the scheduler has
    forgotten failed ("vanished"), a queued one pending, a just-submitted unknown one still pending."""
    a = Stage("t_launch_const", {"value": 1})
    b = Stage("t_launch_add", {"add": 1}, {"x": a.id})
    c = Stage("t_launch_add", {"add": 2}, {"x": b.id})
    q = Stage("t_launch_const", {"value": 2})
    v = Stage("t_launch_const", {"value": 3})
    n = Stage("t_launch_const", {"value": 4})
    study = write_plan(StudyPlan.from_stages("sched", [a, b, c, q, v, n]), tmp_path)
    for sid, jid, age in (
        (a.id, "11_0", 600),
        (b.id, "12_0", 600),
        (c.id, "13_0", 600),
        (q.id, "14_0", 600),
        (v.id, "15_0", 600),
        (n.id, "16_0", 1),
    ):
        _submitted(study, sid, jid, age)
    _fake_scheduler(
        tmp_path, monkeypatch, ["11_0|CANCELLED by 0", "12_0|CANCELLED by 0", "13_0|CANCELLED by 0", "14_0|PENDING"]
    )
    st = {x.stage_id: x for x in status(study).stages}
    assert st[a.id].state == "failed" and "slurm job 11_0 ended CANCELLED without a record" in st[a.id].detail
    assert st[b.id].state == st[c.id].state == "blocked"
    assert st[b.id].detail.startswith(f"input {a.id} failed") and st[c.id].detail.startswith(f"input {a.id} failed")
    assert "(CANCELLED)" in st[b.id].detail
    assert st[q.id].state == "pending" and "(PENDING)" in st[q.id].detail
    assert st[v.id].state == "failed" and "vanished: the scheduler knows no job 15_0" in st[v.id].detail
    assert st[n.id].state == "pending"  # sacct may not list a job for a moment after sbatch
    assert status(study).counts() == {"done": 0, "running": 0, "failed": 2, "blocked": 2, "pending": 2}
    # without sacct/squeue nobody here can tell: pending, and the report says so
    monkeypatch.setenv("PATH", "/nonexistent")
    st = {x.stage_id: x for x in status(study).stages}
    assert st[a.id].state == "pending" and "no sacct/squeue here" in st[a.id].detail


def test_job_exception_is_the_jobs_own_exception_not_submitits_last_line():
    def chained():
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise StageLockedError("stage s-1 is locked by pid 42 on vm: it runs there\nsecond line") from e

    try:
        chained()
    except StageLockedError:
        import traceback

        trace = traceback.format_exc()
    # the text of submitit's FailedJobError around the job's traceback
    text = (
        "Job (task=0) failed during processing with trace:\n----------------------\n"
        + trace
        + "\n----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at "
        "paths:\n  - /r/jobs/7/7_0_log.err\n  - /r/jobs/7/7_0_log.out\n"
    )
    assert launch.job_exception(text) == (
        "StageLockedError: stage s-1 is locked by pid 42 on vm: it runs there second line"
    )
    assert launch.job_exception("no traceback here") is None


# --------------------------------------------------------------------------------------------- profiles
def test_cluster_profiles_and_overrides():
    prof = load_profile("local")
    assert resources_for(prof, "cpu")["partition"] == "debug"
    assert resources_for(prof, "gpu")["gpus_per_node"] == 1
    assert resources_for(prof, "cpu")["timeout_min"] >= 3  # SLURM signals up to 30 s early
    ex = load_profile(ROOT / "slurm" / "example-cluster.yaml", {"timeout_min": 30, "gpu.mem_gb": 12.5})
    gpu = launch.slurm_parameters(resources_for(ex, "gpu"))
    assert gpu["time"] == 30 and gpu["mem"] == "12800MB" and gpu["partition"] == "gpu"
    multi = launch.slurm_parameters(resources_for(ex, "gpu_multi"))
    assert multi["gpus_per_node"] == 8 and multi["ntasks_per_node"] == 8 and multi["time"] == 30
    with pytest.raises(ValueError, match="no resources.tpu"):
        resources_for(prof, "tpu")
    with pytest.raises(ValueError, match="unknown key 'timeout_mins'.*did you mean 'timeout_min'"):
        load_profile({"defaults": {"timeout_mins": 5}})
    with pytest.raises(ValueError, match="override 'gpu.partitio'.*did you mean 'partition'"):
        load_profile("local", {"gpu.partitio": "x"})
    with pytest.raises(FileNotFoundError, match="cluster profile 'nope'"):
        load_profile("nope")


def test_expand_array_job_ids():
    assert launch.expand_job_ids("12") == ["12"]
    assert launch.expand_job_ids("12_3") == ["12_3"]
    assert launch.expand_job_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]


def test_a_damaged_input_is_an_error_naming_the_file_and_a_damaged_stage_is_redone(tmp_path, counter, capsys):
    plan = chain_plan()
    a, b, c, d = ids(plan)
    execute(plan, tmp_path, executor="debug")
    study = tmp_path / "chain"
    (stage_dir(study, b) / RECORD).unlink()  # b must run again ...
    (stage_dir(study, a) / "value.txt").write_text("")  # ... but its input a is damaged
    with pytest.raises(StageInputError, match=str(stage_dir(study, a) / "value.txt")):
        run_stage(study, b)
    summary = execute(plan, tmp_path, executor="debug")
    assert summary.ok and set(summary.done) == {a, b, c} and summary.skipped == (d,)
    assert "value.txt" in capsys.readouterr().err  # the driver says which file made it redo a
    assert payloads(study, plan)[c]["metrics"]["value"] == 1 + 10 + 100 + 1
