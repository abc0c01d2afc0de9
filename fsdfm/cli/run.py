"""`fsdfm run SPEC`: plan the study, --rerun / --dry-run / --print-config, and execute it with an executor."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import yaml

from fsdfm.cli.common import InputError, UsageError, set_threads
from fsdfm.cli.spec import command_line, load_plan, print_config, run_line
from fsdfm.launch import EXECUTORS, DriverInterrupted, execute, load_profile
from fsdfm.launch.backfill import backfill_tracking
from fsdfm.launch.gpus import DEVICES_ENV, NoDevicesError, device_slots
from fsdfm.records import StageLockedError, check_cache_dir, check_stage, discard_stage, is_done, running_holder
from fsdfm.study.graph import STAGE_KINDS, StudyPlan, waves
from fsdfm.tracking import check_available, enable


def _kinds_arg(text: str | None, option: str) -> list[str]:
    """KIND[,KIND] -> registered stage kind names (an unknown one is an UnknownNameError with did-you-mean)."""
    import fsdfm.methods  # noqa: F401  (heavy: torch; registers the method and stage kinds)

    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    if text is not None and not kinds:
        raise UsageError(f"{option}: name at least one stage kind ({', '.join(STAGE_KINDS.names())})")
    for k in kinds:
        STAGE_KINDS.get(k)
    return kinds


def _kind_of(stage_id: str) -> str:
    return stage_id.rsplit("-", 1)[0]  # ids are f"{kind}-{hash}"


def _data_lines(plan) -> dict[str, str]:
    """{field: "sha256:<hex>"} of the data files the plan's stages read (what their ids hold)."""
    out: dict[str, str] = {}
    for s in plan.stages.values():
        for field, digest in (s.fingerprint.get("data") or {}).items():
            src = s.config.get("data", {}).get(field)
            out[f"{field}={src}"] = digest
    return out


def _rerun(plan, sdir: Path, kinds: list[str], dry_run: bool, root: str | None = None) -> list[str]:
    """Remove the stage folders of the plan's stages of `kinds` (their dependents then see a redone input and
    re-run too); nothing is removed under --dry-run. A stage that is running under any study (the lock of its
    store folder, whether or not this study links it yet) is an error naming its holder; each folder is
    emptied under its lock, and only folders the store owns are (`fsdfm.records.store.owned_folder`)."""
    present = {s.kind for s in plan.stages.values()}
    for k in kinds:
        if k not in present:
            raise UsageError(
                f"--rerun: study {plan.name!r} has no {k!r} stage; its kinds: {', '.join(sorted(present))}"
            )
    chosen = [sid for sid, s in plan.stages.items() if s.kind in kinds]
    root = root if root is not None else sdir.parent
    for sid in chosen:
        holder = running_holder(sdir, sid, root)
        if holder is not None:
            raise UsageError(f"--rerun: stage {sid} is running ({holder.describe()}); wait for it or stop it first")
    if not dry_run:
        for sid in chosen:  # emptied where it lives (the shared store): every study sharing it sees it redone
            try:
                discard_stage(sdir, sid, root)
            except StageLockedError as e:  # started between the check and now
                raise UsageError(f"--rerun: {e}; wait for it or stop it first") from None
    return chosen


def cmd_run(args) -> dict:
    import fsdfm.methods  # noqa: F401  (heavy: torch; registers the method and stage kinds)

    resolved, plan = load_plan(args)
    spec = resolved.spec
    sdir = Path(args.results) / plan.name
    if args.print_config:
        return print_config(resolved, sdir)
    if args.track:  # tracking lives in plan.json, not in stage ids: the same stages, now logged (fsdfm.tracking)
        plan = enable(plan, spec.tracking)
    try:
        check_available(plan.tracking)
    except RuntimeError as e:
        raise InputError(str(e)) from None
    if not args.dry_run:
        try:
            check_cache_dir(args.results)  # before the plan is written: not a failure of every stage later
        except ValueError as e:
            raise InputError(str(e)) from None
    rerun_kinds = _kinds_arg(args.rerun, "--rerun")
    threads = args.threads if args.threads is not None else getattr(args, "auto_threads", None)
    if threads is not None:
        set_threads(threads)
    rerun = _rerun(plan, sdir, rerun_kinds, args.dry_run, args.results) if rerun_kinds else []
    if args.dry_run:
        return _dry_run(args, plan, sdir, rerun)
    profile = _profile(args, spec)
    _check_devices(args)
    print(
        f"study {plan.name}: {len(plan.runs)} runs, {len(plan.stages)} stages -> {sdir}  (executor: {args.executor}"
        + (f", torch threads per stage: {threads}" if threads is not None else "")
        + ")",
        flush=True,
    )
    try:
        summary = execute(
            plan,
            args.results,
            executor=args.executor,
            profile=profile,
            wait=not args.no_wait,
            max_parallel=args.max_parallel,
        )
    except KeyboardInterrupt as e:  # SIGTERM/SIGHUP/SIGINT: the executor has cancelled its jobs, released the locks
        signum = e.signum if isinstance(e, DriverInterrupted) else int(signal.SIGINT)  # a Ctrl-C outside the handler
        print(
            f"fsdfm run: interrupted by {signal_name(signum)}; its jobs were stopped. Re-run to resume: {run_line(args)}",
            file=sys.stderr,
        )
        print(json.dumps({"study": plan.name, "ok": False, "interrupted": signal_name(signum), "results": str(sdir)}))
        raise SystemExit(128 + signum) from None
    print(summary.format())
    if plan.tracking and summary.skipped:  # --track on finished stages: log what their records keep
        print(backfill_tracking(plan.to_dict(), sdir, summary.skipped).format())
    # --no-wait: a submission that succeeded is a success (its stages are pending by design); see `fsdfm status`
    ok = summary.ok or (args.no_wait and not summary.failed and not summary.blocked)
    if summary.ok:
        print(f"results: {sdir}   next: fsdfm report {command_line(args)}")
    elif ok:
        print(f"submitted: {len(summary.submitted)} jobs   next: fsdfm status {command_line(args)}")
    elif summary.failed or summary.blocked:
        print(f"after a fix, resume with: {run_line(args)}   (what failed: fsdfm status {command_line(args)})")
    return {
        "study": plan.name,
        "ok": ok,
        **{k: len(getattr(summary, k)) for k in ("done", "skipped", "failed", "blocked", "pending", "submitted")},
        "results": str(sdir),
    }


def _dry_run(args, plan: StudyPlan, sdir: Path, rerun: list[str]) -> dict:
    """--dry-run: print the runs, the data files' hashes and every stage by wave with its state; run nothing."""
    print(f"study {plan.name}: {len(plan.runs)} runs, {len(plan.stages)} stages  ({args.spec})")
    data = _data_lines(plan)
    for src, digest in data.items():
        print(f"  data {src}  {digest[:19]}  (in the ids of the stages that read it)")
    redo = set(rerun)
    for i, wave in enumerate(waves(plan)):
        for s in wave:
            if any(d in redo for d in s.inputs.values()):
                redo.add(s.id)
            state = "rerun" if s.id in redo else check_stage(sdir / "stages" / s.id).state
            state = {"done": "done", "missing": "pending"}.get(state, state)
            print(f"  wave {i}  {state:<7}  {s.id}  <- {', '.join(s.inputs.values()) or '-'}")
    print("runs:")
    for r in plan.runs:
        print(f"  {r.run_id}  -> {r.stage_id}")
    return {
        "study": plan.name,
        "dry_run": True,
        "runs": len(plan.runs),
        "stages": len(plan.stages),
        "done": sum(is_done(sdir / "stages" / s) for s in plan.stages if s not in redo),
        "rerun": sorted(redo),
        "data": data,
    }


def _profile(args, spec) -> str | None:
    """The cluster profile to run with (--profile, else the spec's for SLURM), checked before anything is written
    (execute() writes plan.json before it reads the profile)."""
    profile = args.profile or (spec.cluster.get("profile") if args.executor == "slurm" else None)
    EXECUTORS.get(args.executor)
    if args.executor == "slurm" and profile is None:
        raise UsageError(
            "--executor slurm needs a cluster profile: --profile slurm/<cluster>.yaml (template: "
            "slurm/example-cluster.yaml) or cluster: {profile: ...} in the spec"
        )
    if profile is not None:
        try:
            load_profile(profile)
        except (ValueError, TypeError, OSError) as e:
            raise InputError(str(e)) from None
        except yaml.YAMLError as e:
            raise InputError(f"cluster profile {profile}: not valid YAML: {e}") from None
    return profile


def _check_devices(args) -> None:
    """--devices into the environment the local_gpus executor reads; with --executor local_gpus and no device,
    one InputError before plan.json is written."""
    if getattr(args, "devices", None) is not None:
        os.environ[DEVICES_ENV] = args.devices
    if args.executor == "local_gpus":
        try:
            device_slots()
        except NoDevicesError as e:
            raise InputError(str(e)) from None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
