"""fsdfm.io: the one atomic writer (bytes or a writer callable), its temp-file names (which the records' cleanup
recognises), canonical JSON and the file digest."""

import hashlib
import os
import subprocess
import sys

import pytest

from fsdfm.io import TEMP_FILE, atomic_write, atomic_write_json, canonical_json, read_json, sha256_file, temp_path
from fsdfm.records import remove_stale_temp_files


def test_atomic_write_takes_bytes_or_a_writer(tmp_path):
    p = tmp_path / "a" / "x.bin"
    atomic_write(p, b"bytes")
    assert p.read_bytes() == b"bytes"
    atomic_write(p, lambda f: f.write(b"from a writer"))  # e.g. torch.save(state, f), np.save(f, a)
    assert p.read_bytes() == b"from a writer" and sorted(p.parent.iterdir()) == [p]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "x.bin"
    atomic_write(p, b"old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, broken)
    assert p.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [p]


def test_temp_names_carry_the_writer_pid_and_the_cleanup_recognises_them(tmp_path):
    name = temp_path(tmp_path / "checkpoint.pt").name
    m = TEMP_FILE.match(name)
    assert m and int(m["pid"]) == os.getpid() and name.startswith(".checkpoint.pt.") and name.endswith(".tmp")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / name.replace(f".{os.getpid()}.", f".{dead.pid}.")
    live = tmp_path / name
    stale.write_bytes(b"")
    live.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == [stale]  # the dead writer's; the live one may still rename it
    assert live.exists() and not stale.exists()


def test_canonical_json_and_digest_known_answers(tmp_path):
    assert canonical_json({"b": 1, "a": [1, 2.5], "é": None}) == '{"a":[1,2.5],"b":1,"\\u00e9":null}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})  # ids are never hashed from NaN
    p = tmp_path / "d.bin"
    p.write_bytes(b"abc")
    assert (
        sha256_file(p)
        == hashlib.sha256(b"abc").hexdigest()
        == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    )
    atomic_write_json(tmp_path / "j.json", {"k": (1, 2)})
    assert read_json(tmp_path / "j.json") == {"k": [1, 2]}
