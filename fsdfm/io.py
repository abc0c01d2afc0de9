"""Bytes to disk and back: the one atomic writer, canonical JSON, the sha256 digest of a file.

A leaf: it imports only the standard library and knows nothing of stages, studies or records (the on-disk layout
lives in `fsdfm.records`). Every file the suite writes for another process to read goes through `atomic_write`,
so a reader (or a process restarted after a kill) sees either the old file or the complete new one.

Temp files are named `.<name>.<pid>.<8 hex>.tmp` beside their target (same filesystem, so the rename is atomic):
the pid lets `fsdfm.records.locks.remove_stale_temp_files` delete those whose writer died, the hex keeps two
writers of one process (threads) apart. `TEMP_FILE` is the pattern of those names.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Union

# a temp file of `atomic_write` (".<name>.<pid>.<8 hex>.tmp"); the hex part is optional so that the temp files of
# older checkpoint writers (".<name>.<pid>.tmp") left in a results folder are still recognised as litter; `+?`: the
# shortest name, so an all-digit hex part (p = 2%) is not read as the pid (a live writer's file taken for a dead one's)
TEMP_FILE = re.compile(r"^\..+?\.(?P<pid>\d+)(\.[0-9a-f]{8})?\.tmp$")

Writer = Callable[[IO[bytes]], Any]


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temp-file name beside `path` in the `TEMP_FILE` scheme."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


# what the environment, not the suite, got wrong: an OSError with one of these is a `StorageError` naming the path
STORAGE_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there, or choose a results root on another disk (--results)",
    errno.EDQUOT: "the disk quota is used up: free space there, or choose another results root (--results)",
    errno.EROFS: "the file system is read-only: choose a writable results root (--results)",
    errno.EACCES: "no permission to write there: fix its permissions, or choose another results root (--results)",
    errno.EPERM: "not permitted to write there: fix its permissions, or choose another results root (--results)",
}


class StorageError(OSError):
    """Writing failed for a reason of the environment (disk full, read-only, no permission): one line naming the
    path and what to do. Keeps the errno of the original error."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}; {STORAGE_ADVICE.get(self.errno, 'check the path')}"


def storage_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` as a `StorageError` naming `path` when its errno is one of `STORAGE_ADVICE`, else `e` itself."""
    if isinstance(e, StorageError) or e.errno not in STORAGE_ADVICE:
        return e
    return StorageError(e.errno, e.strerror or os.strerror(e.errno), str(e.filename or path))


def atomic_write(path: str | os.PathLike, data: Union[bytes, Writer]) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    `data` is bytes, or a callable that writes into the binary file object it is given (e.g.
    `lambda f: torch.save(state, f)`, `lambda f: np.save(f, a)`). The bytes go to a unique temp file in the same
    directory (`temp_path`), are flushed and fsync'ed, then `os.replace`d over `path`; the directory is fsync'ed so
    that the rename survives a crash (without it a crash soon after the rename can leave a renamed but empty file,
    whose data blocks were never written back). On any error the temp file is removed and `path` is untouched;
    a full disk, a read-only file system or a missing permission is a `StorageError` naming `path`.
    """
    path = Path(path)
    try:
        _atomic_write(path, data)
    except OSError as e:  # disk full, read-only, no permission: one line naming the file and what to do
        raise storage_error(e, path) from None


def _atomic_write(path: Path, data: Union[bytes, Writer]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory (its entries, e.g. a rename), where the filesystem allows it."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsync'ed
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """`obj` with numpy/torch scalars and arrays turned into Python numbers/lists, Paths into str, tuples into
    lists. Anything else that JSON cannot hold is a TypeError naming its place (`where` + key path).

    Lenient on purpose (NaN stays NaN): it serialises measured results. Stage configs, which ids are hashed from,
    are checked strictly by the stage graph instead (string keys, finite numbers only)."""

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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write` of `obj` as indented JSON with sorted keys (NaN/inf as Python's json writes them)."""
    text = json.dumps(to_jsonable(obj, where=str(path)), indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """The one JSON text of `obj` that ids are hashed from: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; raises OSError / json.JSONDecodeError (callers decide whether that is a warning)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
