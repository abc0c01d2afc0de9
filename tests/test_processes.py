"""Process trees and liveness through psutil (Linux and macOS alike): the descendants a cancelled local job leaves,
zombies counted dead, pid reuse seen through the start time, and locks written before psutil (clock ticks) still
read right."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fsdfm.launch.local import _is_task, _process_tree
from fsdfm.records.locks import _pid_start, pid_alive


def test_process_tree_holds_the_grandchildren_and_is_task_knows_a_submitit_task():
    code = "import subprocess; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); p.wait()"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert set(_process_tree(child.pid)) == {child.pid, grandchild}
        assert _process_tree(os.getpid())[0] == os.getpid() and child.pid in _process_tree(os.getpid())
        assert not _is_task(child.pid)  # a plain python, not `python -m submitit.core._submit`
    finally:
        child.kill()
        child.wait()
        subprocess.run(["kill", str(grandchild)], check=False)
    assert _process_tree(child.pid) == [child.pid]  # gone: itself only, no error


def test_a_zombie_is_dead_and_a_reused_pid_is_another_process():
    p = subprocess.Popen(["true"])
    deadline = time.time() + 30
    while pid_alive(p.pid) and time.time() < deadline:  # exited but not reaped: a zombie until we wait()
        time.sleep(0.02)
    assert not pid_alive(p.pid)
    p.wait()
    me = _pid_start(os.getpid())
    assert me is not None and pid_alive(os.getpid(), me) and not pid_alive(os.getpid(), me - 5.0)
    assert _pid_start(p.pid) is None


def test_a_lock_written_before_psutil_with_clock_ticks_still_names_its_process():
    stat = Path(f"/proc/{os.getpid()}/stat")
    assert sys.platform.startswith("linux") and stat.exists()  # the old format existed only on Linux
    ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks since boot
    assert pid_alive(os.getpid(), ticks)
    assert not pid_alive(os.getpid(), ticks + 10 * os.sysconf("SC_CLK_TCK"))  # 10 s later: another process
