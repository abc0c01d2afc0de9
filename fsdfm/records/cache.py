"""Where the suite caches data: one fixed place per results root, never relative to the working directory.

The data cache (BPE tokenizers, packed token blocks, Hugging Face `datasets` downloads unless
$HF_DATASETS_CACHE is set) lives in

    $FSDFM_CACHE                       when set (made absolute once, see `pin_cache_env`), else
    <results root>/.cache              the results root of the study, as an absolute path.

A stage finds its results root from its own folder, `<root>/<study>/stages/<id>` (recognised by the study's
plan.json beside `stages/`), or `<root>/_stages/<id>` (the shared store it links to, fsdfm.records.store; a path
resolved through the link). A folder outside those layouts (a stage function called by hand on a scratch
directory) gets `default_cache_dir()` = $XDG_CACHE_HOME/fsdfm (default ~/.cache/fsdfm), never a path counted up
from the folder: "three levels up" of a shallow folder used to be `/`, so the cache landed in `/.cache`.

Other caches are already fixed places: the MiniLM featurizer reads the files of its installed package, and a
Hugging Face evaluator named by hub id reads the hub cache ($HF_HOME, default ~/.cache/huggingface).
"""

from __future__ import annotations

import os
from pathlib import Path

from fsdfm.records.layout import PLAN, STAGES, STORE

CACHE_ENV = "FSDFM_CACHE"
CACHE_NAME = ".cache"


def _absolute(path: str | os.PathLike) -> Path:
    # expanduser + abspath, not resolve(): a symlinked results root keeps the name the user gave it
    return Path(os.path.abspath(Path(path).expanduser()))


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fsdfm, or ~/.cache/fsdfm: the cache of stage folders outside a results root."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return _absolute(base) / "fsdfm"


def data_cache_dir(results_root: str | os.PathLike) -> Path:
    """The absolute data cache of a results root: $FSDFM_CACHE when set, else <results_root>/.cache."""
    env = os.environ.get(CACHE_ENV)
    return _absolute(env) if env else _absolute(results_root) / CACHE_NAME


def results_root_of(stage_dir: str | os.PathLike) -> Path | None:
    """<root> of a stage folder <root>/<study>/stages/<id> or <root>/_stages/<id> (absolute), or None for a folder
    outside those layouts."""
    d = _absolute(stage_dir)  # not resolve(): a study's link into the store keeps its study path
    if d.parent.name == STAGES and (d.parent.parent / PLAN).is_file():
        return d.parent.parent.parent
    if d.parent.name == STORE:
        return d.parent.parent
    return None


def stage_cache_dir(stage_dir: str | os.PathLike) -> Path:
    """The data cache a stage uses: $FSDFM_CACHE, else its results root's .cache, else `default_cache_dir()`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return _absolute(env)
    root = results_root_of(stage_dir)
    return root / CACHE_NAME if root is not None else default_cache_dir()


def pin_cache_env() -> None:
    """Make a relative $FSDFM_CACHE absolute in this process's environment, so that every job it starts (which may
    run in another working directory, e.g. on a SLURM node) uses the same folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        os.environ[CACHE_ENV] = str(_absolute(env))


def check_cache_dir(results_root: str | os.PathLike) -> None:
    """A ValueError naming $FSDFM_CACHE (or the default <root>/.cache) when the data cache cannot be a folder
    here: a path under a regular file, or a folder this process may not write. Checked before a plan is
    written, so that a bad cache fails one command instead of every stage."""
    d = data_cache_dir(results_root)
    env = os.environ.get(CACHE_ENV)
    who = f"{CACHE_ENV}={env}" if env else f"the data cache {d} (set {CACHE_ENV} to put it elsewhere)"
    p = d
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{who}: {p} is a file, not a folder; point {CACHE_ENV} at a folder (or unset it)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{who}: {p} is not writable here; point {CACHE_ENV} at a writable folder")
