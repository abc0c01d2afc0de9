"""The results layout, atomic writes, stage locks, provenance and `load() -> pandas.DataFrame`.

Layout (one directory per study, one per stage, content-addressed by stage id):

    <root>/<study>/plan.json                      the expanded study: stages, runs, kinds (written atomically)
    <root>/<study>/jobs/                          submitit's job folders (pickles, stdout/stderr logs)
    <root>/<study>/stages/<stage_id>/record.json  the finished record: {"status": "done", ...}
                                     running.json  while an attempt runs: host, pid, job id, start time
                                     error.json    the last failed attempt: exception type, message, traceback tail
                                     submitted.json the cluster job that will run it (executor, job id, time)
                                     .lock         exclusive lock (O_CREAT|O_EXCL): host, pid, job id
                                     per_sample.csv evaluate stages: one row per sample (`load_samples`)
                                     *             the stage's own artefacts and checkpoints

A stage is done iff its record.json parses, has "status": "done", every artefact it lists under "artefacts"
(path -> size and sha256 of every file the stage left in its folder, see `artefact_manifest`) still has that
size and content, and every input record it read (sha256 under "input_records") is still the current one (an
input that was redone since makes it stale). `check_stage` says which of these fails, naming the file. The
record is written last and atomically (temp file in the same directory + fsync + os.replace), so a process
killed at any point leaves either no record or a complete one; a half-written record can only be a stray temp
file, never record.json.

Every record carries its provenance: resolved config, stage id, input ids, seeds (every `seed`/`*_seed` key of
the config), git commit and dirty flag of the fsdfm source tree ("unknown"/None outside git), python, torch,
transformers and numpy versions, device, hostname, pid, start/end time, wall_s and the SLURM job id if any.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

PLAN = "plan.json"
STAGES = "stages"
JOBS = "jobs"
RECORD = "record.json"
RUNNING = "running.json"
ERROR = "error.json"
SUBMITTED = "submitted.json"
LOCK = ".lock"
STORE = "_stages"  # the shared stage store under the results root (fsdfm.store)
ATTEMPTS = ".attempts"
# files of the machinery, not of the stage: kept when a non-checkpointable stage's out_dir is cleared
CONTROL_FILES = frozenset({RECORD, RUNNING, ERROR, SUBMITTED, LOCK, LOCK + ".break", ATTEMPTS})

SCHEMA_VERSION = 2  # 2: records list their artefacts, input records and fingerprint (code versions, data)
# a lock file that is still empty/unparsable after this long was left by a process killed while creating it
LOCK_WRITE_GRACE_S = 30.0


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    The bytes go to a unique temp file in the same directory (same filesystem, so the rename is atomic), are
    fsync'ed, then `os.replace`d over `path`; the directory is fsync'ed so the rename survives a crash. On any
    error the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_bytes` of `obj` as indented JSON with sorted keys (NaN/inf as Python's json writes them)."""
    text = json.dumps(to_jsonable(obj, where=str(path)), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsync'ed
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """`obj` with numpy/torch scalars and arrays turned into Python numbers/lists, Paths into str, tuples into
    lists. Anything else that JSON cannot hold is a TypeError naming its place (`where` + key path)."""

    def walk(x: Any, p: str) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, dict):
            return {str(k): walk(v, f"{p}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{p}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
            return walk(x.tolist(), p)
        if hasattr(x, "item"):
            return walk(x.item(), p)
        raise TypeError(f"{where}: {p or '<root>'} has type {type(x).__name__}, which cannot be stored as JSON")

    return walk(obj, "")


def read_json(path: Path) -> Any:
    """Parse a JSON file; raises OSError / json.JSONDecodeError (callers decide whether that is a warning)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------- layout
def study_dir(root: str | os.PathLike, study: str) -> Path:
    return Path(root) / study


def stage_dir(study: str | os.PathLike, stage_id: str) -> Path:
    return Path(study) / STAGES / stage_id


def read_record(sdir: Path, warn: bool = True) -> dict | None:
    """The record in stage directory `sdir`, or None when there is none. A record that does not parse (or is
    not a JSON object) is treated as absent, with a `warnings.warn` naming the file when `warn`."""
    path = Path(sdir) / RECORD
    try:
        rec = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if warn:
            warnings.warn(f"skipping corrupt or half-written record {path}: {e}", stacklevel=2)
        return None
    if not isinstance(rec, dict):
        if warn:
            warnings.warn(f"skipping record {path}: not a JSON object", stacklevel=2)
        return None
    return rec


def is_done(sdir: Path) -> bool:
    """A stage is done iff its record.json parses, has status "done" and `check_stage` finds its artefacts and
    input records as recorded."""
    return check_stage(sdir).done


# ------------------------------------------------------------------------------------------- artefacts
# Not artefacts of a stage: the machinery's control files, hidden files (temp files of atomic writes, locks,
# .attempts), logs, and checkpoints under ckpt/ -- resumption state that no other stage reads; a damaged
# checkpoint must not throw away a finished training (the stage would restart from scratch).
NOT_ARTEFACT_DIRS = frozenset({"ckpt"})
LOG_SUFFIXES = (".log", ".out", ".err")


def artefact_paths(sdir: Path) -> list[Path]:
    """Every file the stage left in `sdir` that `artefact_manifest` covers (sorted), whatever its name: a new
    artefact a stage starts writing (e.g. a per-sample table) is covered without being declared."""
    sdir = Path(sdir)
    out = []
    for p in sorted(sdir.rglob("*")):
        rel = p.relative_to(sdir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if (len(rel.parts) == 1 and p.name in CONTROL_FILES) or rel.parts[0] in NOT_ARTEFACT_DIRS \
                or p.name.endswith(LOG_SUFFIXES):
            continue
        out.append(p)
    return out


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int, ino: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised in this process per (path, size, mtime_ns, inode).

    Cost: sha256 ran at 0.35 GB/s on one core of the 2-core dev machine at a load average of 13 (measured; an
    idle core with SHA extensions is several times faster), so the ~5 GB model.pt of the 1.3B preset costs a
    few seconds to ~15 s, once per process (the driver, and each job that reads it as an input), next to the
    hours of training it guards. The memo is safe because it never outlives the process (a new `fsdfm run`/`verify` reads
    every file again, so bit rot is caught there) and within one process any rewrite, truncation or
    replacement of the file changes its size, mtime_ns or inode (os.replace gives a new inode)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_of(str(p), st.st_size, st.st_mtime_ns, st.st_ino)


def artefact_manifest(sdir: Path) -> dict[str, dict]:
    """{relative posix path: {"size": bytes, "sha256": hex}} of every `artefact_paths` file of `sdir`."""
    sdir = Path(sdir)
    return {p.relative_to(sdir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in artefact_paths(sdir)}


def record_digest(sdir: Path) -> str | None:
    """sha256 of the bytes of `sdir`/record.json (None when there is none): which result a dependent read."""
    try:
        return hashlib.sha256((Path(sdir) / RECORD).read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class StageCheck:
    """What `check_stage` found in one stage directory.

    state: "done" (record done; artefacts and input records as recorded), "missing" (no done record),
        "damaged" (an artefact is missing, has another size or another sha256) or "stale" (an input was redone
        after this stage read it). problems: one line per finding, each naming the file.
    verified: whether the record lists its artefacts (records written before artefact hashing do not).
    damaged_files: the paths of the damaged artefacts (state "damaged").
    """

    sdir: str
    state: str
    problems: tuple = ()
    verified: bool = False
    damaged_files: tuple = ()

    @property
    def done(self) -> bool:
        return self.state == "done"


def check_stage(sdir: Path) -> StageCheck:
    """Compare a stage's done record with its folder: artefact sizes and sha256s, and its inputs' current records.

    Sizes are compared first (a truncation costs no hashing); then every artefact is hashed (see `sha256_file`
    for the cost). Input records are found beside `sdir` (the study's stages/ folder)."""
    sdir = Path(sdir)
    rec = read_record(sdir, warn=False)
    if rec is None or rec.get("status") != "done":
        return StageCheck(str(sdir), "missing")
    manifest = rec.get("artefacts")
    problems, damaged = [], []
    if isinstance(manifest, dict):
        for rel, want in sorted(manifest.items()):
            p = sdir / rel
            want = want if isinstance(want, dict) else {}
            try:
                size = p.stat().st_size
            except OSError:
                problems.append(f"{p}: missing (recorded {want.get('size')} bytes)")
                damaged.append(str(p))
                continue
            if size != want.get("size"):
                problems.append(f"{p}: {size} bytes, recorded {want.get('size')} (truncated or rewritten)")
            elif sha256_file(p) != want.get("sha256"):
                problems.append(f"{p}: sha256 {sha256_file(p)[:12]} differs from the recorded "
                                f"{str(want.get('sha256'))[:12]} (same size: overwritten)")
            else:
                continue
            damaged.append(str(p))
    if problems:
        return StageCheck(str(sdir), "damaged", tuple(problems), True, tuple(damaged))
    stale = []
    for name, want in sorted((rec.get("input_records") or {}).items()):
        dep = (rec.get("inputs") or {}).get(name)
        dep_dir = sdir.parent / str(dep)
        if dep is None or record_digest(dep_dir) != want:
            stale.append(f"{dep_dir / RECORD}: input {name!r} was redone (or removed) after this stage read it")
    if stale:
        return StageCheck(str(sdir), "stale", tuple(stale), isinstance(manifest, dict))
    return StageCheck(str(sdir), "done", (), isinstance(manifest, dict))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------- provenance
@functools.lru_cache(maxsize=None)
def git_state(src: str | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git work tree holding the fsdfm sources; ("unknown", None) outside git.

    dirty counts modified tracked files and untracked, not-ignored files (results/ is ignored)."""
    src = src or str(Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", src, *args], capture_output=True, text=True, check=True,
                              timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        dirty: bool | None = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


@functools.lru_cache(maxsize=None)
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Library versions from the installed metadata (no import: torch/transformers cost seconds to import)."""
    out = {"python": platform.python_version()}
    for dist in ("fsdfm", "torch", "transformers", "numpy", "submitit"):
        out[dist] = _version(dist)
    if out["fsdfm"] is None:  # a source checkout that is not pip-installed
        import fsdfm

        out["fsdfm"] = getattr(fsdfm, "__version__", None)
    return out


def device() -> str:
    """"cuda:<name>" when the stage ran with torch and CUDA is available, else "cpu".

    Asked after the stage ran: a stage that never imported torch used no GPU, and importing torch just to
    ask would cost seconds in every job."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device())}"
    return "cpu"


def torch_threads() -> int | None:
    """torch's intra-op thread count when the stage imported torch, else None (asked after the stage ran, like
    `device`). CPU timings depend on it: on a shared 2-core machine two threads ran 4-10x slower than one."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def loadavg_1min() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was around a timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def slurm_job_id() -> str | None:
    """The SLURM job id of this process ("<array>_<task>" for array tasks), None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def job_id() -> str | None:
    """The SLURM job id, else submitit's local job id, else None (in-process)."""
    return slurm_job_id() or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def find_seeds(config: dict) -> dict:
    """Every `seed` or `*_seed` key of a (nested) config, by dotted path: {"train.seed": 1, "sample.seed": 3}."""
    out: dict = {}

    def walk(x: Any, p: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                q = f"{p}.{k}" if p else k
                if (k == "seed" or k.endswith("_seed")) and not isinstance(v, (dict, list)):
                    out[q] = v
                else:
                    walk(v, q)

    walk(config, "")
    return out


def provenance() -> dict:
    """Where and with what this process runs (the per-process part of a record's provenance)."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "job_id": job_id(),
        "argv": list(sys.argv),
    }


# ---------------------------------------------------------------------------------------------------- locks
class StageLockedError(RuntimeError):
    """The stage's lock is held by a live process (another job is running the same stage)."""


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    pid_start: int | None  # the process's start time (clock ticks since boot) to see through pid reuse
    job_id: str | None
    time: str

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.time}"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), None where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # comm may contain spaces
    except (OSError, IndexError):
        return None


def _pid_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat else None  # field 22: start time in clock ticks since boot
    except (ValueError, IndexError):
        return None


def pid_alive(pid: int, pid_start: int | None = None) -> bool:
    """Whether process `pid` on this host is alive (and, given `pid_start`, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat and stat[0] in ("Z", "X"):
        return False  # a killed process nobody reaped yet (containers often run no init that reaps)
    if pid_start is not None:
        now = _pid_start(pid)
        if now is not None and now != pid_start:
            return False  # the pid was reused by another process
    return True


def _read_lock(path: Path) -> LockInfo | None:
    try:
        d = json.loads(path.read_text())
        return LockInfo(host=d["host"], pid=int(d["pid"]), pid_start=d.get("pid_start"), job_id=d.get("job_id"),
                        time=d.get("time", "?"))
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
def stage_lock(sdir: Path, wait: bool = False, poll_s: float = 1.0,
               on_wait: Callable[[LockInfo | None], None] | None = None) -> Iterator[LockInfo]:
    """Hold the exclusive lock of stage directory `sdir` for the duration of the block.

    Created with O_CREAT|O_EXCL, so exactly one process wins. A lock whose holder is dead (same host, pid
    gone or reused; or the same SLURM job, requeued) is broken and retaken; a live one raises
    `StageLockedError` naming the holder, or with `wait=True` is polled every `poll_s` seconds until its holder
    releases it or dies (`on_wait(holder)` is called once per holder waited for, to tell the user). Breaking is
    serialised by a second O_EXCL file, so two processes that both judge a lock stale cannot delete each
    other's fresh lock.
    """
    sdir = Path(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / LOCK
    me = LockInfo(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()), job_id=job_id(),
                  time=now_iso())
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
            f.write(json.dumps(asdict(me)))
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


# a temp file of atomic_write_bytes (".<name>.<pid>.<8 hex>.tmp") or of train.save_checkpoint (".<name>.<pid>.tmp")
_TEMP_FILE = re.compile(r"^\..+\.(?P<pid>\d+)(\.[0-9a-f]{8})?\.tmp$")


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
            m = _TEMP_FILE.match(name)
            if m and not _pid_in_use(int(m["pid"])):
                p = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------- loading
def find_studies(path: str | os.PathLike) -> list[Path]:
    """Study directories under `path`: `path` itself if it holds plan.json, else those up to 3 levels down."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    if (path / PLAN).is_file():
        return [path]
    for depth in range(1, 4):
        found = sorted(p.parent for p in path.glob("/".join(["*"] * depth) + "/" + PLAN))
        # neither a stage folder nor the shared store (fsdfm.store) holds studies
        found = [p for p in found if not {STAGES, STORE} & set(p.relative_to(path).parts)]
        if found:
            return found
    return []


@dataclass(frozen=True)
class StudyListing:
    """One study under a results root (`list_studies`): its name, folder, and how much of it is done."""

    name: str
    path: str
    stages_done: int
    stages_total: int
    runs_done: int
    runs_total: int


def list_studies(root: str | os.PathLike) -> list[StudyListing]:
    """Every study under `root` (as `find_studies` finds them; the shared store is none) with done/total counts
    of its stages and runs (a run is done when its final stage is). "Done" here is "has a done record": listing
    hashes no artefacts (that costs seconds per model file; `fsdfm verify` / `check_stage` do it). A root that
    does not exist lists nothing; an unreadable plan is skipped with a warning naming it."""
    if not Path(root).exists():
        return []
    out = []
    for sdir in find_studies(root):
        plan = _read_plan(sdir)
        if plan is None:
            continue
        done = {sid for sid in plan["stages"]
                if (read_record(stage_dir(sdir, sid), warn=False) or {}).get("status") == "done"}
        runs = [r.get("stage_id") for r in plan["runs"]]
        out.append(StudyListing(plan.get("name", sdir.name), str(sdir), len(done), len(plan["stages"]),
                                sum(sid in done for sid in runs), len(runs)))
    return out


def _read_plan(sdir: Path) -> dict | None:
    try:
        plan = read_json(sdir / PLAN)
        if not isinstance(plan, dict) or "runs" not in plan or "stages" not in plan:
            raise ValueError("not a study plan (needs 'stages' and 'runs')")
        from fsdfm.external import merge_external

        return merge_external(sdir, plan)  # external sample files scored by `fsdfm eval` (fsdfm.external)
    except (OSError, ValueError) as e:
        warnings.warn(f"skipping study {sdir}: unreadable {PLAN}: {e}", stacklevel=3)
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


BASE_COLUMNS = ("study", "run_id", "stage_id")
PROVENANCE_COLUMNS = ("commit", "dirty", "device", "host", "threads", "stage_wall_s", "end_time")


def load(path: str | os.PathLike):
    """One row per run whose final stage is done, as a pandas DataFrame.

    `path` is a study directory or a root holding many. Columns: study, run_id, stage_id; every run parameter
    (dotted names, e.g. "sampler.steps"); every entry of the final record's payload `metrics` (nested dicts
    flattened with dots; lists kept as objects; a metric whose name is also a parameter becomes
    "metrics.<name>"); provenance: commit, dirty, device, host, threads (torch's intra-op threads), stage_wall_s (the
    stage's own run time), end_time. Corrupt or half-written
    record.json files are skipped with a warning naming the file, never read as results.
    """
    import pandas as pd

    rows: list[dict] = []
    param_cols: dict[str, None] = {}
    metric_cols: dict[str, None] = {}
    for sdir in find_studies(path):
        plan = _read_plan(sdir)
        if plan is None:
            continue
        records: dict[str, dict | None] = {}
        for run in plan["runs"]:
            sid = run["stage_id"]
            if sid not in records:  # read (and warn about) each record once, however many runs share it
                records[sid] = read_record(stage_dir(sdir, sid))
            rec = records[sid]
            if rec is None or rec.get("status") != "done":
                continue
            params = _flatten(run.get("params", {}))
            payload = rec.get("payload") or {}
            metrics = _flatten(payload.get("metrics") or {})
            row = {"study": plan.get("name", sdir.name), "run_id": run["run_id"], "stage_id": sid}
            for k, v in params.items():
                row[k] = v
                param_cols[k] = None
            for k, v in metrics.items():
                col = k if k not in params and k not in BASE_COLUMNS and k not in PROVENANCE_COLUMNS \
                    else f"metrics.{k}"
                row[col] = v
                metric_cols[col] = None
            prov = rec.get("provenance", {})
            row.update(commit=prov.get("git_commit"), dirty=prov.get("git_dirty"), device=prov.get("device"),
                       host=prov.get("hostname"), threads=prov.get("torch_threads"), stage_wall_s=prov.get("wall_s"),
                       end_time=prov.get("end_time"))
            rows.append(row)
    columns = list(BASE_COLUMNS) + list(param_cols) + list(metric_cols) + list(PROVENANCE_COLUMNS)
    return pd.DataFrame(rows, columns=columns)


def load_records(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Every done record of the stages in the plans under `path` (optionally only of stage kind `kind`), each
    with "study" and "stage_dir" added. Corrupt records are skipped with a warning naming the file."""
    out = []
    for sdir in find_studies(path):
        plan = _read_plan(sdir)
        if plan is None:
            continue
        for sid, st in plan["stages"].items():
            if kind is not None and st.get("kind") != kind:
                continue
            d = stage_dir(sdir, sid)
            rec = read_record(d)
            if rec is None or rec.get("status") != "done":
                continue
            out.append({**rec, "study": plan.get("name", sdir.name), "stage_dir": str(d)})
    return out


# --------------------------------------------------------------------------------------- per-sample tables
PER_SAMPLE = "per_sample.csv"


def write_per_sample(path: str | os.PathLike, columns: dict) -> None:
    """Write equal-length columns {name: (N,) array} as CSV, atomically. Floats are written with `repr` (the
    shortest text that parses back to the same double), so sums over the loaded table reproduce the stage's."""
    import csv
    import io

    import numpy as np

    names = list(columns)
    arrays = [np.asarray(columns[k]) for k in names]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise ValueError(f"{path}: per-sample columns of different lengths: "
                         + ", ".join(f"{k}={len(a)}" for k, a in zip(names, arrays)))

    def text(x) -> str:
        if isinstance(x, (bool, np.bool_)):
            return "True" if x else "False"
        if isinstance(x, (float, np.floating)):
            return repr(float(x))
        return str(x.item() if hasattr(x, "item") else x)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for row in zip(*arrays):
        w.writerow([text(x) for x in row])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def read_per_sample(path: str | os.PathLike):
    """A per-sample table as a DataFrame, floats parsed back to the very doubles written (pandas >= 3 does so by
    default and deprecates the option; older pandas needs float_precision="round_trip")."""
    import pandas as pd

    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(path, **exact)


def load_samples(path: str | os.PathLike):
    """One row per sample of every run whose final stage is done and wrote a per-sample table, as a DataFrame.

    `path` is a study directory or a root holding many. Columns: study, run_id, stage_id, every run parameter
    (as in `load`), then the table's own columns: sample (index in the run), length (tokens before the first
    EOS), nll / n_tokens / truncated (gen_ppl's summed NLL in nats, scored evaluator tokens, truncation),
    seq_nll / seq_n_tokens (gen_ppl_seq_mean's), entropy_nats, rep_n, oracle_nll (per token; oracle data) —
    each where the run recorded it. Token-pooled gen_ppl = exp(sum nll / sum n_tokens) over a run's rows.
    Runs without a table (recorded before tables existed) are skipped with one warning naming them.
    """
    import pandas as pd

    frames = []
    missing: list[str] = []
    for sdir in find_studies(path):
        plan = _read_plan(sdir)
        if plan is None:
            continue
        for run in plan["runs"]:
            sid = run["stage_id"]
            d = stage_dir(sdir, sid)
            rec = read_record(d, warn=False)
            if rec is None or rec.get("status") != "done":
                continue
            table = d / ((rec.get("payload") or {}).get("per_sample") or PER_SAMPLE)
            if not table.is_file():
                if rec.get("kind") in ("evaluate", "evaluate_data"):
                    missing.append(run["run_id"])
                continue
            df = read_per_sample(table)
            head = {"study": plan.get("name", sdir.name), "run_id": run["run_id"], "stage_id": sid,
                    **_flatten(run.get("params", {}))}
            frames.append(pd.concat([pd.DataFrame({k: [v] * len(df) for k, v in head.items()}, index=df.index), df],
                                    axis=1))
    if missing:
        warnings.warn(f"load_samples: {len(missing)} finished run(s) have no {PER_SAMPLE} (recorded before per-sample "
                      f"tables): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", stacklevel=2)
    if not frames:
        return pd.DataFrame(columns=list(BASE_COLUMNS) + ["sample"])
    return pd.concat(frames, ignore_index=True)
