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

from fsdfm.records.layout import LOCK, STAGES, STORE
from fsdfm.records.loading import find_studies
from fsdfm.records.locks import LockInfo, StageLockedError, lock_holder, stage_lock


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


def _migrate(link: Path, target_dir: Path, rel: str) -> bool:
    """Move the old-layout folder `link` into the store as `target_dir` and link it; False when it is kept
    (running, or the store holds its own copy). Done under the folder's stage lock, so no stage starts in it
    meanwhile; the lock file moves with the folder and is released through the new link."""
    try:
        with stage_lock(link, wait=False):
            with contextlib.suppress(OSError):  # an empty folder made by another study's plan: ours replaces it
                target_dir.rmdir()
            try:
                os.rename(link, target_dir)
            except OSError:  # the store holds its own copy of this id: keep reading ours
                return False
            _symlink_atomic(rel, link)
            return True
    except StageLockedError:  # running: migrated on a later touch
        return False


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
        store_root(root).mkdir(parents=True, exist_ok=True)
        # relative to where the link really is: a study folder that is itself a link (moved to another disk)
        # must still reach <root>/_stages, and the kernel resolves ".." from the link's real folder
        rel = os.path.relpath(store_root(root).resolve() / sid, stages.resolve())
        if link.is_symlink():
            if os.readlink(link) != rel:
                _symlink_atomic(rel, link)  # replaced, never followed: its old target is not ours to touch
                linked.append(sid)
            target_dir.mkdir(parents=True, exist_ok=True)  # a dangling link (store folder removed by hand)
            continue
        if link.is_dir():  # the old layout
            if _migrate(link, target_dir, rel):
                migrated.append(sid)
            else:
                kept.append(sid)
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
    lexical = Path(os.path.normpath(p.parent / os.readlink(p)))
    # a study folder that is itself a link: ".." in the link goes up from its real folder, not from `p.parent`
    return lexical if lexical.exists() and lexical.resolve() == p.resolve() else p.resolve()


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


def owned_folder(study_dir: str | os.PathLike, stage_id: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder a removal of `<study_dir>/stages/<stage_id>` may delete, or None when it may delete nothing.

    Only what the store owns: a link that resolves to `<root>/_stages/<stage_id>` (a real folder, not itself a
    link), or an old-layout real folder that is the study's own (`<study>/stages/<id>` resolving inside the
    study's real stages folder). A link anywhere else (to a folder outside the results root, to another id) is
    never followed: whoever removes the stage unlinks it. `root` defaults to the study folder's parent."""
    study_dir = Path(study_dir)
    root = Path(root) if root is not None else study_dir.parent
    path = study_dir / STAGES / stage_id
    if path.is_symlink():
        target = path.resolve()
        store = store_dir(root, stage_id)
        if store.is_symlink() or not target.is_dir():
            return None
        return target if target == store.resolve() and target.parent == store_root(root).resolve() else None
    if path.is_dir() and path.resolve().parent == (study_dir / STAGES).resolve():
        return path
    return None


def _empty_locked(folder: Path, study: str | None = None) -> None:
    """Delete everything in `folder` under its stage lock (a running stage is never deleted: `StageLockedError`
    names its holder); links inside are unlinked, never followed. The folder itself stays (empty)."""
    with stage_lock(folder, wait=False, study=study):
        for p in folder.iterdir():
            if p.name in (LOCK, LOCK + ".break"):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def running_holder(study_dir: str | os.PathLike, stage_id: str, root: str | os.PathLike | None = None):
    """The live holder (`LockInfo`) of any folder a removal of the stage would touch (the study's folder or
    link target, and the store's folder of that id), else None."""
    root = Path(root) if root is not None else Path(study_dir).parent
    for d in (owned_folder(study_dir, stage_id, root), store_dir(root, stage_id)):
        if d is not None and d.is_dir() and not d.is_symlink():
            holder, live = lock_holder(d)
            if live:
                return holder or LockInfo("?", -1, None, None, "now (the lock is being written)")
    return None


@dataclass(frozen=True)
class Unlinked:
    """What `unlink_stage` did: `deleted` (the stage's files are gone) or kept because `shared_with` studies
    still link it (only this study's link was removed)."""

    stage_id: str
    deleted: bool
    shared_with: tuple = ()


def unlink_stage(study_dir: str | os.PathLike, stage_id: str, root: str | os.PathLike | None = None) -> Unlinked:
    """Remove a stage from one study: its link, and the store folder unless another study still links it.

    An old-layout real folder is deleted (no other study can see it). Only `owned_folder` is ever deleted, and
    under its stage lock (a running stage raises `StageLockedError`, naming the holder, and nothing is removed);
    a link to anything else is just unlinked."""
    link = Path(study_dir) / STAGES / stage_id
    owned = owned_folder(study_dir, stage_id, root)
    if not link.is_symlink():
        if owned is not None:
            _empty_locked(owned)
            with contextlib.suppress(OSError):  # a runner that took the lock just now keeps its folder
                owned.rmdir()
        return Unlinked(stage_id, True)
    others = linked_by(link, exclude=study_dir) if owned is not None else []
    if owned is not None and not others:
        _empty_locked(owned)  # before the link goes: a refusal leaves everything as it was
    os.unlink(link)
    if others:
        return Unlinked(stage_id, False, tuple(p.name for p in others))
    if owned is not None:
        with contextlib.suppress(OSError):
            owned.rmdir()
    return Unlinked(stage_id, True)


def discard_stage(study_dir: str | os.PathLike, stage_id: str, root: str | os.PathLike | None = None) -> None:
    """Empty the stage's folder wherever it lives (store or old layout), keeping the link, so that it is redone;
    every study sharing it sees the redone record (their dependents re-run as stale). With `root`, the store's
    folder of that id is emptied too when the study holds an old-layout copy (else the next plan write would
    link the study to the store's copy and skip the redo).

    Only folders the store owns are emptied (`owned_folder`), each under its stage lock, so a stage running
    under any study is never touched (`StageLockedError` names its holder and study); a link to any other
    folder is unlinked (the next plan write links the study to the store again), its target left alone."""
    path = Path(study_dir) / STAGES / stage_id
    owned = owned_folder(study_dir, stage_id, root)
    targets = [owned] if owned is not None else []
    if owned is None and path.is_symlink():
        os.unlink(path)
    if root is not None:
        store = store_dir(root, stage_id)
        if store.is_dir() and not store.is_symlink() and store.resolve().parent == store_root(root).resolve():
            targets.append(store)
    seen = set()
    for real in targets:
        if real.resolve() not in seen:
            seen.add(real.resolve())
            _empty_locked(real)
