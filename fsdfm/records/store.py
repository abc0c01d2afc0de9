"""One stage store under the results root, shared by every study: a stage whose id two studies plan runs once.

Layout:

    <root>/_stages/<stage_id>/            the only place that holds a stage's files, lock, record and markers
    <root>/<study>/stages/<stage_id>      a relative symlink into it (../../_stages/<stage_id>), made when the
                                          study's plan is written

Stage ids are content-addressed (kind, config, inputs, code and data fingerprints), so one id is one result,
whichever study planned it: the teacher that step_sweep, ablations, seeds and methods all plan is trained once.
Because every study reaches its stages through `<study>/stages/<id>`, everything that works on a stage folder
(`fsdfm.records.stage_dir`, `check_stage`, locks, records, `status`, `verify`, `load`) keeps working
unchanged; and the lock, living in the store folder, serialises two studies that run a shared stage at once.

Old layout (a real directory `<study>/stages/<id>`, written before the store): **migrated on first touch**.
When the plan is written and the store has no (or only an empty) folder for that id, the directory is moved
into the store (one `os.rename`, atomic on one filesystem) and replaced by the link, so its finished work is
reused by every later study instead of being redone. A folder whose stage is running (live lock) is left in
place until a later touch; so is one whose id the store already holds with content (another study ran it
meanwhile): that study then keeps reading its own copy, as it always did. Readers never care which of the two
they see — both are folders at the same path.

Removing: `unlink_stage` (used by `fsdfm clean`) removes one study's link and deletes the store folder only
when no other study still links it; `discard_stage` (used by `run --rerun`) empties the stage's folder wherever
it lives, so every study that shares it sees it redone (their dependents then re-run as stale).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from fsdfm.records.layout import STAGES, STORE
from fsdfm.records.loading import find_studies
from fsdfm.records.locks import lock_holder


def store_root(root: str | os.PathLike) -> Path:
    """<root>/_stages."""
    return Path(root) / STORE


def store_dir(root: str | os.PathLike, stage_id: str) -> Path:
    """<root>/_stages/<stage_id>: where the stage's files live."""
    return store_root(root) / stage_id


@dataclass(frozen=True)
class LinkReport:
    """What `link_stages` did for one study.

    linked: ids newly linked (or re-linked); migrated: ids whose old-layout folder moved into the store;
    kept_local: ids left as a real folder in the study (running, or the store already holds another copy).
    """

    linked: tuple = ()
    migrated: tuple = ()
    kept_local: tuple = ()


def _symlink_atomic(target: str, link: Path) -> None:
    """Make `link` a symlink to `target`, replacing an existing link atomically (temp name, then os.replace)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.link"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _live_lock(d: Path) -> bool:
    return lock_holder(d)[1]


def link_stages(study_dir: str | os.PathLike, stage_ids, root: str | os.PathLike) -> LinkReport:
    """Point `<study_dir>/stages/<id>` at `<root>/_stages/<id>` for every id (creating the store folder).

    A link that already points there is left alone; any other link is replaced atomically; an old-layout real
    folder is migrated into the store when the store holds nothing for that id and the stage is not running
    (see the module docstring), else kept where it is.
    """
    study_dir = Path(study_dir)
    stages = study_dir / STAGES
    stages.mkdir(parents=True, exist_ok=True)
    linked, migrated, kept = [], [], []
    for sid in stage_ids:
        target_dir = store_dir(root, sid)
        link = stages / sid
        rel = os.path.relpath(target_dir, stages)
        if link.is_symlink():
            target_dir.mkdir(parents=True, exist_ok=True)  # a dangling link (store folder removed by hand)
            if os.readlink(link) != rel:
                _symlink_atomic(rel, link)
                linked.append(sid)
            continue
        if link.is_dir():  # the old layout
            if _live_lock(link):
                kept.append(sid)
                continue
            store_root(root).mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # an empty folder made by another study's plan: ours replaces it
                target_dir.rmdir()
            try:
                os.rename(link, target_dir)
            except FileNotFoundError:  # another process migrated it a moment ago: just link
                pass
            except OSError:  # the store holds its own copy of this id: keep reading ours
                kept.append(sid)
                continue
            else:
                migrated.append(sid)
            _symlink_atomic(rel, link)
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        _symlink_atomic(rel, link)
        linked.append(sid)
    if kept:
        warnings.warn(
            f"{stages}: {len(kept)} stage folder(s) of the old layout kept in the study (running, or the "
            f"store {store_root(root)} already holds that id): {', '.join(kept[:3])}"
            f"{' ...' if len(kept) > 3 else ''}",
            stacklevel=2,
        )
    return LinkReport(tuple(linked), tuple(migrated), tuple(kept))


def store_path(stage_path: str | os.PathLike) -> Path:
    """Where a study's stage folder really lives: the store folder its link names (kept relative when the
    link's folder is), or the path itself for an old-layout folder. What stage functions are handed as their
    inputs, so that nothing a shared stage records depends on which study happened to run it."""
    p = Path(stage_path)
    if not p.is_symlink():
        return p
    return Path(os.path.normpath(p.parent / os.readlink(p)))


def linked_by(stage_path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The study folders whose `stages/<id>` link resolves to the store folder `stage_path` points at.

    Studies are found as `find_studies` finds them under the store's results root (the parent of _stages);
    `exclude` (a study folder) is left out."""
    target = Path(stage_path).resolve()
    if target.parent.name != STORE:
        return []
    root = target.parent.parent
    skip = Path(exclude).resolve() if exclude is not None else None
    out = []
    for sdir in find_studies(root):
        if skip is not None and sdir.resolve() == skip:
            continue
        link = sdir / STAGES / target.name
        if link.is_symlink() and link.resolve() == target:
            out.append(sdir)
    return out


@dataclass(frozen=True)
class Unlinked:
    """What `unlink_stage` did: `deleted` (the stage's files are gone) or kept because `shared_with` studies
    still link it (only this study's link was removed)."""

    stage_id: str
    deleted: bool
    shared_with: tuple = ()


def unlink_stage(study_dir: str | os.PathLike, stage_id: str) -> Unlinked:
    """Remove a stage from one study: its link, and the store folder unless another study still links it.

    An old-layout real folder is deleted (no other study can see it)."""
    link = Path(study_dir) / STAGES / stage_id
    if not link.is_symlink():
        if link.exists():
            shutil.rmtree(link)
        return Unlinked(stage_id, True)
    others = linked_by(link, exclude=study_dir)
    target = link.resolve()
    os.unlink(link)
    if others:
        return Unlinked(stage_id, False, tuple(p.name for p in others))
    if target.parent.name == STORE and target.is_dir():
        shutil.rmtree(target)
    return Unlinked(stage_id, True)


def discard_stage(study_dir: str | os.PathLike, stage_id: str, root: str | os.PathLike | None = None) -> None:
    """Empty the stage's folder wherever it lives (store or old layout), keeping the link, so that it is redone;
    every study sharing it sees the redone record (their dependents re-run as stale). With `root`, the store's
    folder of that id is emptied too when the study holds an old-layout copy (else the next plan write would
    link the study to the store's copy and skip the redo)."""
    path = Path(study_dir) / STAGES / stage_id
    targets = [path.resolve()] if path.exists() else []
    if root is not None and store_dir(root, stage_id).is_dir():
        targets.append(store_dir(root, stage_id).resolve())
    for real in dict.fromkeys(targets):
        shutil.rmtree(real)
        if real.parent.name == STORE:
            real.mkdir(parents=True, exist_ok=True)  # the links to it stay valid
