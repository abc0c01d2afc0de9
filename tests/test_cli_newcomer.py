"""A researcher's first hour with the command line (issue 24, item 4): overrides anywhere on the line, hints that
repeat the exact command, Ctrl-C as clean as SIGTERM, report-only sections that never block a plan."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fsdfm.cli import main
from fsdfm.records import RUNNING, read_plan

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "newc",
    "data": {
        "kind": "oracle",
        "seq_len": 8,
        "oracle": {
            "source": "markov",
            "vocab_size": 6,
            "order": 1,
            "support": 2,
            "epsilon": 0.001,
            "seed": 1,
            "n_train": 64,
            "n_valid": 16,
        },
    },
    "model": {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2},
    "sampling": {"n_samples": 4, "batch_size": 4, "seed": 0},
    "evaluator": {"kind": "none"},
    "methods": {
        "dfm": {
            "kind": "dfm",
            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "ema_decay": None},
            "rules": ["euler"],
            "budgets": [2, 4],
        }
    },
    "metrics": {"names": ["entropy_nats", "rep_n"]},
    "report": {"pairs": [["dfm@2", "dfm@4"]]},
}


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def spec(tmp_path) -> Path:
    p = tmp_path / "newc.yaml"
    p.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return p


def test_overrides_are_accepted_anywhere_on_the_line(spec, tmp_path, capsys):
    """9c2f443: `fsdfm run SPEC --dry-run seed=3` was "unrecognized arguments"."""
    root = str(tmp_path / "r")
    assert main(["run", str(spec), "--dry-run", "seed=3", "--results", root, "sampling.seed=2"]) == 0
    late = last_json(capsys.readouterr().out)
    assert main(["--results", root, "run", str(spec), "seed=3", "sampling.seed=2", "--dry-run"]) == 0
    early = last_json(capsys.readouterr().out)
    assert late == early and late["study"] == "newc+sampling.seed-2+seed-3"
    # what is not an override is still argparse's error
    with pytest.raises(SystemExit) as e:
        main(["run", str(spec), "--dry-run", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


def test_a_report_pair_never_blocks_an_unrelated_override(spec, tmp_path, capsys):
    """9c2f443: report.pairs naming dfm@4 made `methods.dfm.steps=[2]` (now `budgets`) an error; the pair is a report setting."""
    root = str(tmp_path / "r")
    with pytest.warns(UserWarning, match=r"report\.pairs\[0\] \['dfm@2', 'dfm@4'\] dropped after the overrides"):
        assert main(["--results", root, "run", str(spec), "methods.dfm.budgets=[2]", "--executor", "debug"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["ok"] and read_plan(Path(root) / out["study"])["report"]["pairs"] == []
    # the spec file's own pairs are still checked strictly: a pair that names nothing there is an error
    bad = {**SPEC, "report": {"pairs": [["dfm@2", "dfm@64"]]}}
    spec.write_text(yaml.safe_dump(bad))
    assert main(["--results", root, "run", str(spec), "--dry-run"]) == 2
    assert "report.pairs[0]: 'dfm@64': dfm is not sampled at 64 steps" in capsys.readouterr().err


def test_the_next_hint_repeats_the_study_and_its_results_root(spec, tmp_path, capsys):
    root = str(tmp_path / "my results")
    assert main(["run", str(spec), "seed=3", "--limit", "2", "--executor", "debug", "--results", root]) == 0
    out = capsys.readouterr().out
    assert f"next: fsdfm report {spec} seed=3 --limit 2 --results '{root}'" in out


def _interrupt_a_run(spec, tmp_path, root, sig):
    """Start `fsdfm run` on a long training, send `sig` once the stage runs; (returncode, stdout, stderr), or None
    when the process had not exited 60 s after the signal (it is killed then)."""
    args = ["run", str(spec), "seed=3", "--executor", "inline", "--threads", "1", "--results", str(root)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsdfm.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background test runner may ignore SIGINT; a terminal's Ctrl-C reaches a process that does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list((root / "_stages").glob(f"*/{RUNNING}")) if (root / "_stages").exists() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training never started"
        time.sleep(0.1)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_is_as_clean_as_sigterm_and_the_resume_line_is_exact(spec, tmp_path, sig):
    """9c2f443: Ctrl-C printed a raw traceback and the resume hint dropped --results, --executor, --threads.

    One retry: in one full-suite run of a fresh clone the process had not exited 60 s after SIGINT (never seen
    when the test runs alone; under investigation, see the README's known issues). A second hang fails."""
    long = {**SPEC, "methods": {"dfm": {**SPEC["methods"]["dfm"], "train": {"steps": 100000, "batch_size": 4}}}}
    spec.write_text(yaml.safe_dump(long))
    for attempt in range(2):
        root = tmp_path / f"r{attempt}"
        result = _interrupt_a_run(spec, tmp_path, root, sig)
        if result is not None:
            break
    assert result is not None, "the run did not exit within 60 s of the signal, twice"
    rc, out, err = result
    name = signal.Signals(sig).name
    assert rc == 128 + sig
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    resume = f"fsdfm run {spec} seed=3 --results {root} --executor inline --threads 1"
    assert f"fsdfm run: interrupted by {name}; its jobs were stopped. Re-run to resume: {resume}" in err
    assert last_json(out)["interrupted"] == name


def test_a_report_under_results_does_not_make_the_tree_dirty(tmp_path):
    """9c2f443: .gitignore un-ignores results/*/report/, so after the first report every record said "dirty"."""
    from fsdfm.records.provenance import git_state

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    report = tmp_path / "results" / "demo" / "report"
    report.mkdir(parents=True)
    (report / "index.md").write_text("# report\n")
    probe = git_state.__wrapped__  # uncached: the state changes within the test
    assert probe(str(tmp_path))[1] is False
    (tmp_path / "code.py").write_text("x = 2\n")  # a change to the code is still dirty
    assert probe(str(tmp_path))[1] is True


def test_threads_are_chosen_not_to_oversubscribe_and_recorded(spec, tmp_path, monkeypatch, capsys):
    """9c2f443: `make demo` at load 10-13 on 2 cores took 73 min (239 s idle): torch's threads fought other jobs."""
    from fsdfm.cli.common import auto_threads
    from fsdfm.records import load_records

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (10.0, 10.0, 10.0))
    assert auto_threads(None)[0] == 1  # busy: one thread
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert auto_threads(None)[0] == 8 and auto_threads(4)[0] == 2  # idle: the cores, shared by the parallel stages
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    n, why = auto_threads(1)
    assert n == 3 and why == "auto: 8 usable cores, load 5.0, 1 stage(s) at once -> 3"
    # fsdfm run without --threads or OMP_NUM_THREADS: the auto count, said on the first line and recorded
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FSDFM_THREADS_SOURCE"):
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "r"
    assert main(["--results", str(root), "run", str(spec), "--executor", "debug"]) == 0
    assert "torch threads per stage: 3)" in capsys.readouterr().out
    rec = next(iter(load_records(root / "newc")))
    assert rec["provenance"]["threads_source"] == why and rec["provenance"]["torch_threads"] == 3


def test_progress_lines_off_a_terminal_and_the_progress_file(tmp_path, capsys, monkeypatch):
    """9c2f443: `make demo` was silent for 25 min when not on a terminal. A loop reports every tenth of its steps
    as a line on stderr (not a terminal here) and in progress.json, which is gone when the stage ends."""
    from fsdfm import progress

    monkeypatch.delenv(progress.ENV, raising=False)
    with progress.stage_progress(tmp_path, "train_x-1"):
        for i in range(1, 21):
            progress.step(i, 20, "train", loss=1.0 / i)
            if i == 20:
                assert progress.read_progress(tmp_path)["step"] == 20
    assert not (tmp_path / progress.PROGRESS_FILE).exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "train_x-1: train step" in ln]
    assert [ln.split("step ")[1].split(",")[0] for ln in lines] == [f"{2 * k}/20" for k in range(1, 11)]
    assert "left" in lines[0] and "loss 0.5" in lines[0]
    progress.step(1, 10)  # outside a stage: nothing, no error


def test_status_names_the_runs_of_each_stage_and_a_running_stages_step(spec, tmp_path, capsys):
    """9c2f443: `fsdfm status` showed opaque stage ids, no run label, no step and no time left."""
    long = {**SPEC, "methods": {"dfm": {**SPEC["methods"]["dfm"], "train": {"steps": 100000, "batch_size": 4}}}}
    spec.write_text(yaml.safe_dump(long))
    root = tmp_path / "r"
    assert main(["--results", str(root), "status", str(spec)]) == 0  # before any run: labels already
    out = capsys.readouterr().out
    train = next(ln for ln in out.splitlines() if "train_dfm-" in ln)
    assert "[dfm/euler@2, dfm/euler@4]" in train
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "err.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsdfm.cli", "--results", str(root), "run", str(spec), "--executor", "inline"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.log").read_text()
            capsys.readouterr()
            main(["--results", str(root), "status", str(spec)])
            line = next(ln for ln in capsys.readouterr().out.splitlines() if "train_dfm-" in ln)
            if "running" in line and "left" in line:
                break
            time.sleep(0.5)
        assert re.search(
            r"running\s+train_dfm-\w+\s+\[dfm/euler@2, dfm/euler@4\] train dfm teacher step \d+/100000, ~[\d.]+ (s|min|h) left; ",
            line,
        ), line
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
