"""Against a real single-node SLURM cluster (`make test-slurm` starts slurm/start_slurm.sh and sets SLURM_CONF).

Selected only by `-m slurm`, so an unset SLURM_CONF is a failure with instructions, never a skip.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdfm.launch import execute, status, wait_for
from fsdfm.io import atomic_write_json, read_json
from fsdfm.records import RECORD, RUNNING, SUBMITTED, stage_dir
from fsdfm.study.graph import RunSpec, Stage, StudyPlan, stage_kind

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]


def require_cluster() -> None:
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        pytest.fail(
            "SLURM_CONF is not set: these tests need the single-node cluster. Run `make test-slurm`, or "
            "`bash slurm/start_slurm.sh` then `SLURM_CONF=/tmp/fsdfm-slurm/slurm.conf pytest -m slurm`."
        )
    if not Path(conf).is_file() or shutil.which("sbatch") is None:
        pytest.fail(f"SLURM_CONF={conf} does not exist or sbatch is not on PATH: start slurm/start_slurm.sh")
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.fail(f"the cluster does not answer (sinfo: {out.stderr.strip()}); start slurm/start_slurm.sh")


@stage_kind("t_slurm_const")
def const_stage(config, inputs, out_dir):
    (out_dir / "value.txt").write_text(str(config["value"]))
    if config.get("fail"):
        raise RuntimeError(f"const stage told to fail ({config['value']})")
    return {"metrics": {"value": config["value"]}}


@stage_kind("t_slurm_sum")
def sum_stage(config, inputs, out_dir):
    total = sum(int((d / "value.txt").read_text()) for d in inputs.values()) * config["scale"]
    (out_dir / "value.txt").write_text(str(total))
    env = ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_CPUS_PER_TASK")
    return {"metrics": {"value": total}, "env": {k: os.environ.get(k) for k in env}}


@stage_kind("t_slurm_gpu_sum", resources="gpu")
def gpu_sum_stage(config, inputs, out_dir):
    return sum_stage(config, inputs, out_dir)


STEPS, MOD = 40, 1_000_003


def lcg(x: int, k: int) -> int:
    """One deterministic "training step"."""
    return (x * 48271 + k) % MOD


@stage_kind("t_slurm_train", checkpointable=True)
def train_stage(config, inputs, out_dir):
    """A training-like loop: `steps` steps of 0.5 s with a checkpoint after every step; resumes exactly."""
    ckpt = out_dir / "ckpt.json"
    state = read_json(ckpt) if ckpt.exists() else {"step": 0, "x": config["x0"]}
    start = state["step"]
    for k in range(start, config["steps"]):
        time.sleep(config["sleep_s"])
        state = {"step": k + 1, "x": lcg(state["x"], k)}
        atomic_write_json(ckpt, state)
    return {
        "metrics": {
            "x": state["x"],
            "steps": state["step"],
            "resumed_from": start,
            "steps_this_attempt": state["step"] - start,
        }
    }


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def test_study_submits_with_dependencies_and_returns(tmp_path, monkeypatch):
    require_cluster()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    a = Stage("t_slurm_const", {"value": 2})
    b = Stage("t_slurm_const", {"value": 3})
    bad = Stage("t_slurm_const", {"value": 4, "fail": True})
    s = Stage("t_slurm_sum", {"scale": 10}, {"a": a.id, "b": b.id})
    g = Stage("t_slurm_gpu_sum", {"scale": 100}, {"a": a.id})
    after_bad = Stage("t_slurm_sum", {"scale": 1}, {"bad": bad.id})
    top = Stage("t_slurm_sum", {"scale": 1}, {"s": s.id, "g": g.id})
    plan = StudyPlan.from_stages(
        "slurm-study",
        [a, b, bad, s, g, after_bad, top],
        [RunSpec("top", {"method": "sum"}, top.id), RunSpec("bad", {"method": "bad"}, after_bad.id)],
    )

    t0 = time.time()
    summary = execute(plan, tmp_path, executor="slurm", profile="local", wait=False)
    assert time.time() - t0 < 30  # returns once submitted; the jobs run without this process
    assert set(summary.pending) == set(plan.stages) == set(summary.submitted)
    jid = summary.submitted
    assert jid[a.id].split("_")[0] == jid[b.id].split("_")[0] == jid[bad.id].split("_")[0]  # one array: wave 0
    # wave 1: one submission per (resource class, input jobs): s, g and after_bad each stand alone
    assert len({jid[x.id].split("_")[0] for x in (s, g, after_bad)}) == 3
    sub = read_json(stage_dir(tmp_path / "slurm-study", top.id) / SUBMITTED)
    assert sub["job_id"] == jid[top.id]
    script = next((tmp_path / "slurm-study" / "jobs").rglob(f"{jid[s.id]}_submission.sh")).read_text()
    assert f"--dependency=afterok:{':'.join(sorted([jid[a.id], jid[b.id]]))}" in script
    assert "--kill-on-invalid-dep=yes" in script

    result = wait_for(tmp_path / "slurm-study", timeout_s=150, poll_s=1.0)
    assert set(result.done) == {a.id, b.id, s.id, g.id, top.id}, result.format()
    assert list(result.failed) == [bad.id] and "told to fail" in result.failed[bad.id]
    assert result.blocked == (after_bad.id,)  # cancelled by SLURM (invalid dependency), not pending forever

    rec = read_json(stage_dir(tmp_path / "slurm-study", top.id) / RECORD)
    assert rec["payload"]["metrics"]["value"] == (2 + 3) * 10 + 2 * 100
    assert rec["provenance"]["slurm_job_id"] == jid[top.id]
    grec = read_json(stage_dir(tmp_path / "slurm-study", g.id) / RECORD)
    assert grec["payload"]["env"]["SLURM_GPUS_ON_NODE"] == "1"  # the fake GRES was allocated
    assert status(tmp_path / "slurm-study").counts() == {
        "done": 5,
        "running": 0,
        "failed": 1,
        "blocked": 1,
        "pending": 0,
    }

    again = execute(plan, tmp_path, executor="slurm", profile="local", wait=True, timeout_s=120, poll_s=1.0)
    assert set(again.skipped) == set(result.done)  # done stages are not resubmitted
    assert set(again.submitted) == {bad.id, after_bad.id} and list(again.failed) == [bad.id]


def _wait_step(ckpt: Path, at_least: int, timeout_s: float = 90) -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            step = json.loads(ckpt.read_text())["step"]
            if step >= at_least:
                return step
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{ckpt} never reached step {at_least}")


def _wait_attempt(sdir: Path, attempt: int, timeout_s: float = 90) -> int:
    """Wait until attempt `attempt` runs (running.json) and return the checkpoint step it resumed from."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if read_json(sdir / RUNNING)["attempt"] == attempt:
                return read_json(sdir / "ckpt.json")["step"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"attempt {attempt} of {sdir.name} never started")


def test_checkpointable_stage_survives_requeue_and_preemption(tmp_path, monkeypatch):
    """`scontrol requeue` (the job is killed and restarted), then USR2 (submitit's checkpoint + self-requeue):
    the stage resumes from its checkpoints and ends where an uninterrupted run ends."""
    require_cluster()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    cfg = {"steps": STEPS, "x0": 12345, "sleep_s": 0.5}
    st = Stage("t_slurm_train", cfg)
    plan = StudyPlan.from_stages("requeue", [st], [RunSpec("train", {"x0": 12345}, st.id)])
    summary = execute(plan, tmp_path, executor="slurm", profile="local", wait=False)
    jid = summary.submitted[st.id]
    sdir = stage_dir(tmp_path / "requeue", st.id)
    ckpt = sdir / "ckpt.json"

    _wait_step(ckpt, 4)  # the first attempt is training
    _slurm("scontrol", "requeue", jid)  # as an admin or a node failure would
    # the killed attempt goes on for KillWait seconds (submitit ignores SIGTERM), so wait for attempt 2 itself
    second = _wait_attempt(sdir, 2)
    _wait_step(ckpt, second + 2)
    _slurm("scancel", "--signal=USR2", jid)  # preemption/timeout warning: submitit checkpoints and requeues

    result = wait_for(tmp_path / "requeue", timeout_s=150, poll_s=1.0)
    assert result.done == (st.id,), result.format()
    rec = read_json(stage_dir(tmp_path / "requeue", st.id) / RECORD)
    m = rec["payload"]["metrics"]
    x = cfg["x0"]
    for k in range(STEPS):
        x = lcg(x, k)
    assert m["x"] == x and m["steps"] == STEPS  # the same result as an uninterrupted run
    assert m["resumed_from"] >= second + 2 and m["steps_this_attempt"] == STEPS - m["resumed_from"]
    assert rec["provenance"]["attempt"] == 3 and rec["provenance"]["slurm_job_id"] == jid
    log = "".join(p.read_text() for p in (tmp_path / "requeue" / "jobs").rglob("*_log.*"))
    assert "DUE TO JOB REQUEUE" in log  # SLURM did kill and requeue it ...
    assert "Calling checkpoint method" in log and f"Requeued job {jid}" in log  # ... and so did submitit on USR2


ORACLE_SPEC = """
name: slurm_oracle
data:
  kind: oracle
  seq_len: 12
  oracle: {source: markov, vocab_size: 8, order: 1, support: 2, epsilon: 0.001, seed: 3, n_train: 400, n_valid: 64}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 16, batch_size: 16, seed: 5}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 20, batch_size: 16, warmup_steps: 5, ema_decay: 0.9}, rules: [cumulative_scalar], budgets: [2]}
  fs: {kind: fsdfm, teacher: dfm, distill: {K: 3}, train: {steps: 4, batch_size: 8, warmup_steps: 2, ema_decay: 0.9}, budgets: [2]}
metrics:
  names: [oracle_nll, entropy_nats]
"""


def test_real_study_through_the_cli_on_slurm_matches_a_local_run(tmp_path):
    """`fsdfm run SPEC --executor slurm` on the test cluster: every stage is a SLURM job (arrays per wave with
    afterok dependencies), and the metrics equal those of the same study run in-process."""
    require_cluster()
    spec = tmp_path / "slurm_oracle.yaml"
    spec.write_text(ORACLE_SPEC)
    # One intra-op thread in both runs (sbatch exports the environment), so float reductions match exactly.
    env = {**os.environ, "FSDFM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def run(results: Path, *extra: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "fsdfm.cli", "--results", str(results), "run", str(spec), *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    on_slurm = run(tmp_path / "slurm", "--executor", "slurm", "--profile", str(ROOT / "slurm" / "local.yaml"))
    assert on_slurm["ok"] and on_slurm["failed"] == 0
    inline = run(tmp_path / "inline", "--executor", "debug")
    assert inline["ok"]
    from fsdfm.records import load

    a = load(tmp_path / "slurm" / "slurm_oracle").sort_values("run_id").reset_index(drop=True)
    b = load(tmp_path / "inline" / "slurm_oracle").sort_values("run_id").reset_index(drop=True)
    assert len(a) == len(b) == 3
    assert a.oracle_nll.tolist() == pytest.approx(b.oracle_nll.tolist(), rel=1e-9)
    recs = [read_json(p) for p in (tmp_path / "slurm" / "slurm_oracle" / "stages").glob("*/record.json")]
    assert recs and all(r["provenance"]["slurm_job_id"] for r in recs)


# 3,000 steps (~45 s on an idle core, 15 ms a step): the cancel must land while training runs; 400 steps
# finished in 6 s on an idle machine, before the scancel that followed the first checkpoint took effect
CANCEL_SPEC = ORACLE_SPEC.replace("name: slurm_oracle", "name: slurm_cancel").replace(
    "train: {steps: 20, batch_size: 16, warmup_steps: 5, ema_decay: 0.9}",
    "train: {steps: 3000, batch_size: 16, warmup_steps: 5, ema_decay: 0.9, ckpt_every: 25}",
)


def test_cancelled_job_is_failed_in_status_with_its_dependents_blocked_and_a_rerun_completes(tmp_path):
    """`fsdfm run --no-wait` exits 0 after submitting; `scancel` of the running training job; `fsdfm status` asks
    SLURM and reports that stage failed (CANCELLED) and every stage behind it blocked (their jobs were killed
    by --kill-on-invalid-dep), not "pending"; the re-run resumes training from its checkpoint and completes."""
    require_cluster()
    assert "steps: 3000" in CANCEL_SPEC
    spec = tmp_path / "slurm_cancel.yaml"
    spec.write_text(CANCEL_SPEC)
    env = {**os.environ, "FSDFM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"

    def cli(*args: str) -> tuple[int, dict, str]:
        out = subprocess.run(
            [sys.executable, "-m", "fsdfm.cli", "--results", str(results), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return out.returncode, json.loads(out.stdout.strip().splitlines()[-1]), out.stdout + out.stderr

    profile = str(ROOT / "slurm" / "local.yaml")
    rc, sub, text = cli("run", str(spec), "--executor", "slurm", "--profile", profile, "--no-wait")
    assert rc == 0 and sub["ok"] and sub["failed"] == 0 and sub["pending"] == sub["submitted"] > 0, text
    study = results / "slurm_cancel"
    plan = read_json(study / "plan.json")
    train = next(sid for sid, s in plan["stages"].items() if s["kind"] == "train_dfm")
    downstream, grew = {train}, True
    while grew:
        grew = False
        for sid, s in plan["stages"].items():
            if sid not in downstream and set(s.get("inputs", {}).values()) & downstream:
                downstream.add(sid)
                grew = True
    downstream.discard(train)
    assert downstream  # the distillation, sampling and evaluation stages
    tdir = stage_dir(study, train)
    _wait_step_file(tdir / "ckpt" / "checkpoint.pt")  # training, with a checkpoint written
    jid = read_json(tdir / SUBMITTED)["job_id"]
    _slurm("scancel", jid)
    assert not (tdir / RECORD).exists(), "training finished before the cancel: make CANCEL_SPEC's training longer"

    deadline = time.time() + 120
    while True:
        rc, st, text = cli("status", str(spec))
        assert rc == 0, text
        if st["failed"] >= 1 or time.time() > deadline:
            break
        time.sleep(2)
    lines = {ln.split()[1]: ln for ln in text.splitlines() if ln.startswith("  ") and len(ln.split()) > 1}
    assert lines[train].split()[0] == "failed" and f"slurm job {jid} ended CANCELLED" in lines[train], text
    for sid in downstream:
        assert lines[sid].split()[0] == "blocked" and f"input {train} failed" in lines[sid], text
    assert st["failed"] == 1 and st["blocked"] == len(downstream) and st["pending"] == 0, text

    rc, again, text = cli("run", str(spec), "--executor", "slurm", "--profile", profile)
    assert rc == 0 and again["ok"] and again["failed"] == 0, text
    rec = read_json(tdir / RECORD)
    assert rec["payload"]["resumed_from"] >= 25  # from the cancelled attempt's checkpoint
    rc, st, text = cli("status", str(spec))
    assert st["done"] == len(plan["stages"]) and st["failed"] == st["blocked"] == st["pending"] == 0, text


def _wait_step_file(path: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)
