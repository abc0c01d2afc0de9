"""Stage locks, the liveness of the processes that hold them, and the litter killed processes leave.

Knows the lock file of a stage folder and the temp-file names of `fsdfm.io`; knows nothing of what a stage
computes. A stage runs under `stage_lock`, so two jobs (two runs of one study, two studies sharing a stage in
the store, a requeued SLURM attempt and its dying predecessor) never run the same stage at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil

from fsdfm.io import TEMP_FILE
from fsdfm.records.layout import LOCK, now_iso
from fsdfm.records.provenance import job_id, slurm_job_id

# a lock file that is still empty/unparsable after this long was left by a process killed while creating it
LOCK_WRITE_GRACE_S = 30.0


# ---------------------------------------------------------------------------------------------------- locks
class StageLockedError(RuntimeError):
    """The stage's lock is held by a live process (another job is running the same stage)."""


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    pid_start: float | None  # the process's start time (psutil, seconds since the epoch) to see through pid reuse
    job_id: str | None
    time: str
    study: str | None = None  # the study whose run took it (a shared stage in the store is run by one of many)

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        study = f", study {self.study}" if self.study else ""
        return f"pid {self.pid} on {self.host}{job}{study}, since {self.time}"


def _this_process(study: str | None) -> LockInfo:
    """The LockInfo of this process, now (a lock or a driver mark it writes)."""
    pid = os.getpid()
    return LockInfo(socket.gethostname(), pid, _pid_start(pid), job_id(), now_iso(), study)


def _pid_start(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch, psutil: Linux, macOS, BSD), None when it is gone
    or cannot be asked. With the pid it names one process: a pid reused later has another start time."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


# a start time below this is from a lock written before psutil: clock ticks since boot (/proc/<pid>/stat field 22)
_TICKS_FORMAT_BELOW = 1e9


def _same_start(recorded: float, now: float) -> bool:
    """Whether a recorded start time is `now`'s (psutil's float is stable for a process to well under 10 ms; an
    old lock's clock ticks since boot are converted with the boot time and the tick rate, to the second)."""
    if recorded < _TICKS_FORMAT_BELOW:
        try:
            ticks = os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError, AttributeError):
            return True  # cannot convert: trust the pid
        return abs(psutil.boot_time() + recorded / ticks - now) < 1.0
    return abs(recorded - now) < 0.01


def pid_alive(pid: int, pid_start: float | None = None) -> bool:
    """Whether process `pid` on this host is alive (and, given `pid_start`, is the same process): psutil, so the
    same on Linux and macOS. A zombie (killed, not reaped: containers often run no init that reaps) is dead."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        now = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # exists, owned by someone else
    if pid_start is not None and not _same_start(float(pid_start), now):
        return False  # the pid was reused by another process
    return True


def _read_lock(path: Path) -> LockInfo | None:
    try:
        d = json.loads(path.read_text())
        return LockInfo(
            host=d["host"],
            pid=int(d["pid"]),
            pid_start=d.get("pid_start"),
            job_id=d.get("job_id"),
            time=d.get("time", "?"),
            study=d.get("study"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_holder(sdir: Path) -> tuple[LockInfo | None, bool]:
    """(holder, live) for the lock of stage dir `sdir`; (None, False) when it is not locked."""
    path = Path(sdir) / LOCK
    if not path.exists():
        return None, False
    info = _read_lock(path)
    return info, not _lock_is_stale(path, info)


def _lock_is_stale(path: Path, info: LockInfo | None) -> bool:
    if info is None:  # empty or garbled: its writer may be between O_EXCL and write, or died there
        try:
            return time.time() - path.stat().st_mtime > LOCK_WRITE_GRACE_S
        except FileNotFoundError:
            return True
    if info.host == socket.gethostname():
        return not pid_alive(info.pid, info.pid_start)
    # another host: we cannot see its processes; but SLURM runs a job id once at a time, so a lock taken by
    # this very job (a requeued attempt that was killed) is stale
    mine = slurm_job_id()
    return mine is not None and info.job_id == mine


@contextlib.contextmanager
def stage_lock(
    sdir: Path,
    wait: bool = False,
    poll_s: float = 1.0,
    on_wait: Callable[[LockInfo | None], None] | None = None,
    study: str | None = None,
) -> Iterator[LockInfo]:
    """Hold the exclusive lock of stage directory `sdir` for the duration of the block.

    Created with O_CREAT|O_EXCL, so exactly one process wins. A lock whose holder is dead (same host, pid
    gone or reused; or the same SLURM job, requeued) is broken and retaken; a live one raises
    `StageLockedError` naming the holder, or with `wait=True` is polled every `poll_s` seconds until its holder
    releases it or dies (`on_wait(holder)` is called once per holder waited for, to tell the user); `study` is
    recorded in the lock so that whoever finds it busy can name the study that runs it. Breaking is
    serialised by a second O_EXCL file, so two processes that both judge a lock stale cannot delete each
    other's fresh lock.
    """
    sdir = Path(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / LOCK
    me = _this_process(study)
    tries, waited_for = 0, []
    while tries < 5:
        tries += 1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_lock(path)
            if _lock_is_stale(path, info):
                _break_lock(path, info)
                continue
            if wait:
                if info is not None and info not in waited_for:
                    waited_for.append(info)
                    if on_wait is not None:
                        on_wait(info)
                tries = 0  # a live holder is not "changing hands": wait as long as it lives
                time.sleep(poll_s)
                continue
            who = info.describe() if info else "a process that is still writing the lock file"
            raise StageLockedError(f"stage {sdir.name} is locked by {who} ({path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({k: v for k, v in asdict(me).items() if v is not None or k != "study"}))
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise StageLockedError(f"could not take the lock {path} (it kept changing hands)")
    try:
        yield me
    finally:
        if _read_lock(path) == me:  # never remove a lock that someone broke and retook meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _break_lock(path: Path, judged: LockInfo | None) -> None:
    guard = path.with_name(path.name + ".break")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        # someone else is breaking it; a guard this old was left by a process killed in these few lines
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > LOCK_WRITE_GRACE_S:
                os.unlink(guard)
        time.sleep(0.05)
        return
    os.close(fd)
    try:
        # re-read under the guard: only delete the very lock that was judged stale
        if _read_lock(path) == judged and _lock_is_stale(path, judged):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.unlink(guard)


def break_stale_lock(sdir: Path) -> bool:
    """Remove the lock of stage dir `sdir` if its holder is dead (as `stage_lock` would); True if one was removed.

    A driver calls this for the stages whose job processes it has just killed, so that no lock outlives them."""
    path = Path(sdir) / LOCK
    if not path.exists():
        return False
    info = _read_lock(path)
    if info is None or not _lock_is_stale(path, info):
        return False
    _break_lock(path, info)
    return not path.exists()


def _pid_in_use(pid: int) -> bool:
    try:
        return pid_alive(pid)
    except (OverflowError, ValueError):  # no such pid can exist (beyond the kernel's pid range)
        return False


def remove_stale_temp_files(sdir: Path) -> list[Path]:
    """Delete the temp files under stage dir `sdir` (any depth) whose writer process is gone; returns them.

    A process killed between creating a temp file and renaming it (atomic writes, checkpoints) leaves it behind,
    often empty; nothing ever reads one, so each kill would otherwise leave litter for good. Run under the stage
    lock, when no other attempt of the stage can be writing; a temp file whose pid is alive is kept all the same
    (a requeued SLURM attempt can overlap the dying one for a few seconds)."""
    removed = []
    for dirpath, _dirs, files in os.walk(sdir):
        for name in files:
            m = TEMP_FILE.match(name)
            if m and not _pid_in_use(int(m["pid"])):
                p = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------- drivers
DRIVER_MARK = ".driver"  # <study>/.driver.<pid>: a driver (`fsdfm run`) of this study is running


@contextlib.contextmanager
def driver_mark(study_dir: str | os.PathLike, study: str | None = None) -> Iterator[LockInfo]:
    """Mark `study_dir` as driven by this process for the duration of the block (`<study>/.driver.<pid>`).

    Not exclusive (two runs of one study may overlap; their stages serialise on the stage locks): it lets
    `fsdfm clean` refuse to delete stages under a driver that is about to run their dependents."""
    path = Path(study_dir) / f"{DRIVER_MARK}.{os.getpid()}"
    me = _this_process(study)
    path.write_text(json.dumps(asdict(me)))
    try:
        yield me
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def live_drivers(study_dir: str | os.PathLike) -> list[LockInfo]:
    """The live drivers of `study_dir` (`driver_mark`); marks of dead ones are removed as litter."""
    out = []
    for p in sorted(Path(study_dir).glob(f"{DRIVER_MARK}.*")):
        info = _read_lock(p)
        if not _lock_is_stale(p, info):
            if info is not None:
                out.append(info)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return out
