"""`fsdfm verify` and `fsdfm clean`: check a study's records and artefacts without running anything, and remove
stage folders (never a running one)."""

from __future__ import annotations

import sys
from pathlib import Path

from fsdfm.cli.common import UsageError
from fsdfm.cli.run import _kind_of, _kinds_arg
from fsdfm.cli.spec import command_line, load_plan, study_dir
from fsdfm.records import (
    ERROR,
    StageLockedError,
    check_stage,
    is_done,
    live_drivers,
    read_plan,
    running_holder,
    unlink_stage,
)
from fsdfm.study.graph import PlanError, StudyPlan, waves


def cmd_verify(args) -> dict:
    """Check every stage of a study (record, artefact sizes and sha256s, input records) without running anything."""
    target = Path(args.target)
    if target.is_dir():
        sdir = target
        try:
            plan = StudyPlan.from_dict(read_plan(sdir), str(sdir / "plan.json"))
        except PlanError as e:
            raise UsageError(str(e)) from None
    else:
        _, plan = load_plan(args)
        sdir = Path(args.results) / plan.name
    counts = {"done": 0, "damaged": 0, "stale": 0, "missing": 0, "failed": 0, "unverified": 0}
    problems: dict[str, list[str]] = {}
    print(f"study {plan.name} ({sdir}): checking {len(plan.stages)} stages")
    for wave in waves(plan):
        for s in wave:
            d = sdir / "stages" / s.id
            check = check_stage(d)
            state = "failed" if check.state == "missing" and (d / ERROR).exists() else check.state
            counts[state] += 1
            note = ""
            if check.done and not check.verified:
                counts["unverified"] += 1
                note = "  (record lists no artefacts: written before artefact hashing)"
            print(f"  {state:<8} {s.id}{note}")
            for line in check.problems:
                print(f"           | {line}")
            if check.problems:
                problems[s.id] = list(check.problems)
    bad = counts["damaged"] + counts["stale"]
    print(
        f"{counts['done']} ok, {counts['damaged']} damaged, {counts['stale']} stale, {counts['failed']} failed, "
        f"{counts['missing']} not run" + (f"; next: fsdfm run {command_line(args)} redoes them" if bad else "")
    )
    return {"study": plan.name, "ok": bad == 0, **counts, "problems": problems}


def cmd_clean(args) -> dict:
    """Remove stage folders of a study: all, those of --kind, or only --failed ones; never a running stage.

    A stage in the shared store (fsdfm.records.store) that another study still links loses only this study's link.
    Only folders the store owns are deleted (a link to anything else is unlinked, never followed), each under its
    stage lock; a stage running under any study is kept, and a study whose driver (`fsdfm run`) is running is
    refused: the driver would go on to run the dependents of what was removed."""
    sdir = study_dir(args)
    kinds = _kinds_arg(args.kind, "--kind")
    drivers = live_drivers(sdir) if sdir.is_dir() else []
    if drivers:
        raise UsageError(
            f"clean: study {sdir.name} is being run by {drivers[0].describe()}; stop that run first "
            "(or wait for it to end), then clean"
        )
    stages_dir = sdir / "stages"
    found = sorted(p.name for p in stages_dir.iterdir() if p.is_dir() or p.is_symlink()) if stages_dir.is_dir() else []
    chosen, running = [], {}
    for sid in found:
        d = stages_dir / sid
        if kinds and _kind_of(sid) not in kinds:
            continue
        if args.failed and not ((d / ERROR).exists() and not is_done(d)):
            continue
        holder = running_holder(sdir, sid)
        if holder is not None:
            running[sid] = holder
        else:
            chosen.append(sid)
    for sid, holder in running.items():
        print(f"  keeping {sid}: running ({holder.describe()})")
    running = sorted(running)
    what = ("failed " if args.failed else "") + (f"{'/'.join(kinds)} " if kinds else "")
    if not chosen:
        print(f"study {sdir.name}: no {what}stage folders to remove")
        return {"study": sdir.name, "removed": 0, "stages": [], "running": running}
    for sid in chosen:
        print(f"  remove {stages_dir / sid}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"clean: would remove {len(chosen)} {what}stage folders of {sdir}; not a terminal, "
                "so pass --yes to confirm"
            )
        answer = input(f"remove {len(chosen)} {what}stage folders of study {sdir.name}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing removed")
            return {"study": sdir.name, "removed": 0, "stages": [], "running": running}
    shared, removed = {}, []
    for sid in chosen:  # a stage another study still links keeps its files; only this study's link goes
        try:
            u = unlink_stage(sdir, sid)
        except StageLockedError as e:  # started since the check: kept, as a running stage always is
            print(f"  keeping {sid}: {e}")
            running.append(sid)
            continue
        removed.append(sid)
        if not u.deleted:
            shared[sid] = list(u.shared_with)
            print(f"  kept the files of {sid}: still used by {', '.join(u.shared_with)}")
    print(
        f"study {sdir.name}: removed {len(removed)} {what}stage folders"
        + (f" ({len(shared)} only unlinked: shared with other studies)" if shared else "")
    )
    return {"study": sdir.name, "removed": len(removed), "stages": removed, "running": running, "shared": shared}
