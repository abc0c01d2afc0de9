"""The local_gpus executor (one machine, several GPUs, no SLURM), on CPU with a faked device list (FSDFM_DEVICES).

The stage kinds live in this module: the job processes import it by name (plan.json records the module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdfm.io import read_json
from fsdfm.launch import execute
from fsdfm.launch.gpus import DEVICES_ENV, NoDevicesError, device_slots
from fsdfm.records import RECORD, SUBMITTED, stage_dir
from fsdfm.study.graph import Stage, StudyPlan, stage_kind

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@stage_kind("t_gpus_meet")
def meet_stage(config, inputs, out_dir):
    """Announce this stage in the shared folder, then wait until `config["n"]` stages have announced themselves:
    it ends only if all n ran at the same time (run one after another, the first would wait forever)."""
    barrier = Path(config["barrier"])
    (barrier / f"{config['name']}.json").write_text(
        json.dumps({"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    )
    deadline = time.time() + 120
    while len(list(barrier.glob("*.json"))) < config["n"]:
        if time.time() > deadline:
            raise TimeoutError(f"{config['name']}: the other stages never started beside this one")
        time.sleep(0.05)
    return {"metrics": {"seen": len(list(barrier.glob("*.json")))}}


@stage_kind("t_gpus_after")
def after_stage(config, inputs, out_dir):
    return {"metrics": {"inputs": len(inputs), "device": os.environ.get("CUDA_VISIBLE_DEVICES")}}


@pytest.fixture
def jobs_env(monkeypatch):
    # job processes import this module by name: make the repo and tests/ importable for them
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_device_slots_come_from_fsdfm_devices_then_cuda_visible_devices():
    assert device_slots({DEVICES_ENV: "0,1", "CUDA_VISIBLE_DEVICES": "5"}) == ["0", "1"]
    assert device_slots({DEVICES_ENV: " 2, 3 ,2"}) == ["2", "3", "2"]  # a GPU named twice: two slots
    assert device_slots({"CUDA_VISIBLE_DEVICES": "GPU-ab12,GPU-cd34"}) == ["GPU-ab12", "GPU-cd34"]
    for bad in ("", "0,,1", "0 1"):
        with pytest.raises(NoDevicesError, match=DEVICES_ENV):
            device_slots({DEVICES_ENV: bad})


def test_without_a_device_variable_the_slots_are_what_nvidia_smi_lists(tmp_path, monkeypatch):
    # a fake nvidia-smi on PATH (the one parser of `nvidia-smi -L`, shared with the local executor's GPU count)
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert device_slots({}) == ["0", "1"]
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")
    with pytest.raises(NoDevicesError, match="nvidia-smi lists none"):
        device_slots({})


def test_two_stages_run_at_once_each_on_its_own_device_and_the_record_says_which(tmp_path, jobs_env, monkeypatch):
    monkeypatch.setenv(DEVICES_ENV, "0,1")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    a = Stage("t_gpus_meet", {"name": "a", "n": 2, "barrier": str(barrier)})
    b = Stage("t_gpus_meet", {"name": "b", "n": 2, "barrier": str(barrier)})
    c = Stage("t_gpus_after", {"x": 1}, {"a": a.id, "b": b.id})  # starts only once both are done
    plan = StudyPlan.from_stages("gpus", [a, b, c])
    s = execute(plan, tmp_path / "results", executor="local_gpus", poll_s=0.1, timeout_s=300)
    assert s.ok and set(s.done) == {a.id, b.id, c.id}, s.format()
    seen = {p.stem: json.loads(p.read_text())["cuda_visible_devices"] for p in barrier.glob("*.json")}
    assert sorted(seen.values()) == ["0", "1"]  # each saw one GPU, not the same one
    study = tmp_path / "results" / "gpus"
    recorded = {
        sid: read_json(stage_dir(study, sid) / RECORD)["provenance"]["cuda_visible_devices"] for sid in (a.id, b.id)
    }
    assert recorded == {a.id: seen["a"], b.id: seen["b"]}
    assert read_json(stage_dir(study, c.id) / RECORD)["payload"]["metrics"]["device"] in ("0", "1")
    assert not (stage_dir(study, c.id) / SUBMITTED).exists()  # removed once the record is written


def test_one_slot_runs_stages_one_at_a_time_and_a_failure_blocks_only_dependents(tmp_path, jobs_env, monkeypatch):
    monkeypatch.setenv(DEVICES_ENV, "3")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # "bad" writes into a folder that does not exist: it fails, and only its dependent is blocked
    ok = Stage("t_gpus_meet", {"name": "ok", "n": 1, "barrier": str(barrier)})
    bad = Stage("t_gpus_meet", {"name": "bad", "n": 1, "barrier": str(tmp_path / "missing")})
    after_bad = Stage("t_gpus_after", {}, {"x": bad.id})
    s = execute(StudyPlan.from_stages("one", [ok, bad, after_bad]), tmp_path / "r", executor="local_gpus", poll_s=0.1)
    assert s.done == (ok.id,) and list(s.failed) == [bad.id] and s.blocked == (after_bad.id,)
    assert "FileNotFoundError" in s.failed[bad.id]
    assert read_json(stage_dir(tmp_path / "r" / "one", ok.id) / RECORD)["provenance"]["cuda_visible_devices"] == "3"


def test_cli_refuses_local_gpus_without_devices_and_writes_nothing(tmp_path):
    spec = ROOT / "experiments" / "demo.yaml"
    env = {k: v for k, v in os.environ.items() if k not in (DEVICES_ENV, "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsdfm.cli",
            "--results",
            str(tmp_path),
            "run",
            str(spec),
            "--executor",
            "local_gpus",
            "--devices",
            "0,,1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "FSDFM_DEVICES='0,,1'" in r.stderr
    assert not list(tmp_path.iterdir())
