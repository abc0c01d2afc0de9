"""Command line: `fsdfm run SPEC`, `fsdfm status SPEC|DIR`, `fsdfm report SPEC|DIR`, `fsdfm samples SPEC|DIR`,
`fsdfm verify SPEC|DIR`, `fsdfm clean SPEC|DIR`, `fsdfm ls`, `fsdfm eval FILES --spec SPEC`.

Every command prints for humans and ends with one JSON line for machines. Bad input (a malformed spec,
a missing file, an unknown name) is one message naming what and where, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from fsdfm.cli_spec import command_line, load_plan, print_config, study_dir
from fsdfm.cli_status import cmd_status

DEFAULT_ROOT = "results"


class InputError(ValueError):
    """Bad command-line input that is not a spec (an unreadable cluster profile, ...): exit 2, one message."""


class UsageError(ValueError):
    """A command line that cannot be carried out as given (exit 2, nothing changed)."""


def _offline_defaults() -> None:
    # The suite never downloads at run time unless asked: a hub lookup would otherwise retry for ~30 s.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _read_plan(sdir: Path) -> dict:
    """plan.json of a study directory; a missing, corrupt or malformed one is a PlanError / FileNotFoundError."""
    from fsdfm.launch import read_plan
    from fsdfm.study.graph import PlanError, StudyPlan

    plan = read_plan(sdir)
    try:
        StudyPlan.from_dict(plan, str(sdir / "plan.json"))
    except PlanError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise PlanError(f"{sdir / 'plan.json'}: not a valid study plan ({type(e).__name__}: {e})") from None
    return plan


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_thread_env(n: int) -> None:
    """OMP/MKL thread counts in the environment. OpenMP and BLAS read them once, when numpy / torch are first
    imported, so `main` calls this before importing either: the inline executor then computes with the same
    thread pools as the jobs of the local executor (which start fresh processes with this environment)."""
    for key in THREAD_ENV:
        os.environ[key] = str(n)


def set_threads(n: int) -> None:
    """n intra-op threads here (inline and debug executors) and in every job this process starts (submitit local
    processes and SLURM jobs inherit the environment)."""
    set_thread_env(n)
    import torch

    torch.set_num_threads(n)


def _kinds_arg(text: str | None, option: str) -> list[str]:
    """KIND[,KIND] -> registered stage kind names (an unknown one is an UnknownNameError with did-you-mean)."""
    import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
    from fsdfm.study.graph import STAGE_KINDS

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
    re-run too); nothing is removed under --dry-run. A stage that is running is an error."""
    from fsdfm.results import lock_holder

    present = {s.kind for s in plan.stages.values()}
    for k in kinds:
        if k not in present:
            raise UsageError(f"--rerun: study {plan.name!r} has no {k!r} stage; "
                             f"its kinds: {', '.join(sorted(present))}")
    chosen = [sid for sid, s in plan.stages.items() if s.kind in kinds]
    for sid in chosen:
        holder, live = lock_holder(sdir / "stages" / sid)
        if live:
            raise UsageError(f"--rerun: stage {sid} is running ({holder.describe() if holder else 'starting'}); "
                             "wait for it or stop it first")
    if not dry_run:
        from fsdfm.store import discard_stage

        for sid in chosen:  # emptied where it lives (the shared store): every study sharing it sees it redone
            discard_stage(sdir, sid, root)
    return chosen


def cmd_run(args) -> dict:
    import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
    from fsdfm.launch import execute
    from fsdfm.results import check_stage, is_done
    from fsdfm.study.graph import waves

    resolved, plan = load_plan(args)
    spec = resolved.spec
    sdir = Path(args.results) / plan.name
    if args.print_config:
        return print_config(resolved, sdir)
    if args.track:  # tracking lives in plan.json, not in stage ids: the same stages, now logged (fsdfm.tracking)
        from fsdfm.tracking import enable
        plan = enable(plan, spec.tracking)
    from fsdfm.tracking import check_available
    try:
        check_available(plan.tracking)
    except RuntimeError as e:
        raise InputError(str(e)) from None
    rerun_kinds = _kinds_arg(args.rerun, "--rerun")
    if args.threads is not None:
        set_threads(args.threads)
    rerun = _rerun(plan, sdir, rerun_kinds, args.dry_run, args.results) if rerun_kinds else []
    if args.dry_run:
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
        return {"study": plan.name, "dry_run": True, "runs": len(plan.runs), "stages": len(plan.stages),
                "done": sum(is_done(sdir / "stages" / s) for s in plan.stages if s not in redo),
                "rerun": sorted(redo), "data": data}
    profile = args.profile or (spec.cluster.get("profile") if args.executor == "slurm" else None)
    from fsdfm.launch import EXECUTORS, load_profile
    EXECUTORS.get(args.executor)  # checked here too: execute() writes plan.json before it reads the profile
    if args.executor == "slurm" and profile is None:
        raise UsageError("--executor slurm needs a cluster profile: --profile slurm/<cluster>.yaml (template: "
                         "slurm/example-cluster.yaml) or cluster: {profile: ...} in the spec")
    if profile is not None:
        import yaml
        try:
            load_profile(profile)
        except (ValueError, TypeError, OSError) as e:
            raise InputError(str(e)) from None
        except yaml.YAMLError as e:
            raise InputError(f"cluster profile {profile}: not valid YAML: {e}") from None
    print(f"study {plan.name}: {len(plan.runs)} runs, {len(plan.stages)} stages -> {sdir}  (executor: {args.executor})",
          flush=True)
    from fsdfm.launch import DriverInterrupted

    try:
        summary = execute(plan, args.results, executor=args.executor, profile=profile, wait=not args.no_wait,
                          max_parallel=args.max_parallel)
    except DriverInterrupted as e:  # SIGTERM/SIGHUP: the executor has cancelled its jobs and released the locks
        print(f"fsdfm run: {e}; its jobs were stopped. Re-run to resume: fsdfm run {command_line(args)}", file=sys.stderr)
        print(json.dumps({"study": plan.name, "ok": False, "interrupted": signal_name(e.signum), "results": str(sdir)}))
        raise SystemExit(128 + e.signum) from None
    print(summary.format())
    # --no-wait: a submission that succeeded is a success (its stages are pending by design); see `fsdfm status`
    ok = summary.ok or (args.no_wait and not summary.failed and not summary.blocked)
    if summary.ok:
        print(f"results: {sdir}   next: fsdfm report {command_line(args)}")
    elif ok:
        print(f"submitted: {len(summary.submitted)} jobs   next: fsdfm status {command_line(args)}")
    return {"study": plan.name, "ok": ok, "done": len(summary.done), "skipped": len(summary.skipped),
            "failed": len(summary.failed), "blocked": len(summary.blocked), "pending": len(summary.pending),
            "submitted": len(summary.submitted), "results": str(sdir)}


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


# what a bare `pip install fsdfm` lacks for a command: the extra and the modules it brings
EXTRAS = {"report": ("analysis", ("matplotlib", "seaborn", "scipy"))}


def require_extra(command: str) -> None:
    """An InputError naming the extra to install when a module `command` needs is missing."""
    import importlib

    extra, modules = EXTRAS[command]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f"fsdfm {command} needs the {extra!r} extra (module {name!r} is not installed): "
                             f"pip install 'fsdfm[{extra}]'") from None


def cmd_report(args) -> dict:
    sdir = study_dir(args)
    _read_plan(sdir)
    require_extra("report")
    from fsdfm.report import write_report

    try:
        out = write_report(sdir, Path(args.out) if args.out else sdir / "report")
    except ModuleNotFoundError as e:  # a module of an extra imported deep inside (the list above missed it)
        raise InputError(f"fsdfm report needs the 'analysis' extra (module {e.name!r} is not installed): "
                         "pip install 'fsdfm[analysis]'") from None
    print(f"report: {out.index}")
    return {"study": sdir.name, "report": str(out.index), "tables": [str(p) for p in out.tables],
            "figures": [str(p) for p in out.figures]}


def cmd_samples(args) -> dict:
    """Print the first decoded samples of every evaluated run (method, rule, step budget)."""
    import json as _json

    from fsdfm.results import read_record

    sdir = study_dir(args)
    plan = _read_plan(sdir)
    shown = 0
    for run in plan["runs"]:
        rec = read_record(sdir / "stages" / run["stage_id"], warn=False)
        if rec is None or "samples" not in rec.get("inputs", {}):
            continue
        texts = sdir / "stages" / rec["inputs"]["samples"] / "samples.jsonl"
        if not texts.exists():
            continue
        p = run["params"]
        print(f"=== {p.get('label') or p['method']} | rule {p.get('rule')} | {p.get('steps')} steps ===")
        for line in texts.read_text().splitlines()[: args.n]:
            text = " ".join(_json.loads(line)["text"].split())
            print("  " + (text[: args.chars] + " ..." if len(text) > args.chars else text))
        shown += 1
    return {"study": sdir.name, "runs_shown": shown}


def cmd_verify(args) -> dict:
    """Check every stage of a study (record, artefact sizes and sha256s, input records) without running anything."""
    from fsdfm.launch import read_plan
    from fsdfm.results import ERROR, check_stage
    from fsdfm.study.graph import PlanError, StudyPlan, waves

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
    print(f"{counts['done']} ok, {counts['damaged']} damaged, {counts['stale']} stale, {counts['failed']} failed, "
          f"{counts['missing']} not run" + (f"; next: fsdfm run {args.target} redoes them" if bad else ""))
    return {"study": plan.name, "ok": bad == 0, **counts, "problems": problems}


def cmd_clean(args) -> dict:
    """Remove stage folders of a study: all, those of --kind, or only --failed ones; never a running stage.

    A stage in the shared store (fsdfm.store) that another study still links loses only this study's link."""
    from fsdfm.results import ERROR, is_done, lock_holder

    sdir = study_dir(args)
    kinds = _kinds_arg(args.kind, "--kind")
    stages_dir = sdir / "stages"
    found = sorted(p.name for p in stages_dir.iterdir() if p.is_dir()) if stages_dir.is_dir() else []
    chosen, running = [], []
    for sid in found:
        d = stages_dir / sid
        if kinds and _kind_of(sid) not in kinds:
            continue
        if args.failed and not ((d / ERROR).exists() and not is_done(d)):
            continue
        holder, live = lock_holder(d)
        (running if live else chosen).append(sid)
    for sid in running:
        print(f"  keeping {sid}: running ({lock_holder(stages_dir / sid)[0].describe()})")
    what = ("failed " if args.failed else "") + (f"{'/'.join(kinds)} " if kinds else "")
    if not chosen:
        print(f"study {sdir.name}: no {what}stage folders to remove")
        return {"study": sdir.name, "removed": 0, "stages": [], "running": running}
    for sid in chosen:
        print(f"  remove {stages_dir / sid}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"clean: would remove {len(chosen)} {what}stage folders of {sdir}; not a terminal, "
                             "so pass --yes to confirm")
        answer = input(f"remove {len(chosen)} {what}stage folders of study {sdir.name}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing removed")
            return {"study": sdir.name, "removed": 0, "stages": [], "running": running}
    from fsdfm.store import unlink_stage

    shared = {}
    for sid in chosen:  # a stage another study still links keeps its files; only this study's link goes
        u = unlink_stage(sdir, sid)
        if not u.deleted:
            shared[sid] = list(u.shared_with)
            print(f"  kept the files of {sid}: still used by {', '.join(u.shared_with)}")
    print(f"study {sdir.name}: removed {len(chosen)} {what}stage folders"
          + (f" ({len(shared)} only unlinked: shared with other studies)" if shared else ""))
    return {"study": sdir.name, "removed": len(chosen), "stages": chosen, "running": running, "shared": shared}


def _eval_study_dir(args) -> Path:
    """`fsdfm eval --spec X`: X is a spec file (its study under --results) or a study directory."""
    import argparse as _argparse

    return study_dir(_argparse.Namespace(target=args.spec, results=args.results, overrides=[], limit=None))


def cmd_eval(args) -> dict:
    """Score external sample files with a study's metrics and evaluator (fsdfm.external), recorded as runs."""
    from fsdfm.external import ExternalError, eval_files

    sdir = _eval_study_dir(args)
    _read_plan(sdir)  # the study's plan must exist: its evaluate config and evaluator are what score the files
    try:
        done = eval_files(sdir, sdir.parent, args.files, args.label)
    except ExternalError as e:
        raise InputError(str(e)) from None
    for r in done:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()) if isinstance(v, float))
        print(f"  {r.label:<24} {r.stage_id}  {shown}")
    print(f"study {sdir.name}: scored {len(done)} external file(s)   next: fsdfm report {args.spec}")
    return {"study": sdir.name, "runs": [{"file": r.file, "label": r.label, "stage_id": r.stage_id,
                                          "run_id": r.run_id, "metrics": r.metrics} for r in done]}


def _spec_args(p: argparse.ArgumentParser, target: str, help_: str) -> None:
    """SPEC (or a study directory), then KEY=VALUE overrides and --limit: the same study for every command."""
    p.add_argument(target, help=help_)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec overrides (a.b=1, methods.fsdfm.distill.K=8), sweeps (seed=0,1,2, grid.KEY=[...]); "
                        "see fsdfm/overrides.py")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="smoke run: N samples per run, training shrunk as the spec's limit: section says "
                        "(its own study, <name>+limit-N)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fsdfm", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=DEFAULT_ROOT, help="results root (default: results)")
    # --results also after the subcommand: SUPPRESS keeps the top-level value unless it is given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", default=argparse.SUPPRESS, help="results root (default: results)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", parents=[common], help="run (or --dry-run) a study spec")
    _spec_args(r, "spec", "a study spec (experiments/*.yaml)")
    r.add_argument("--dry-run", action="store_true", help="print the runs and stages with their ids and done state")
    r.add_argument("--print-config", action="store_true",
                   help="print the spec with the overrides and --limit applied (YAML) and exit; runs nothing")
    r.add_argument("--executor", default="local", help="local (default: submitit local processes), inline (in this process, with progress bars), debug (in-process, for tests) or slurm")
    r.add_argument("--profile", help="cluster profile YAML for --executor slurm (e.g. slurm/local.yaml)")
    r.add_argument("--no-wait", action="store_true",
                   help="submit and return (slurm); exits 0 once the submission succeeded (then: fsdfm status)")
    r.add_argument("--max-parallel", type=int, default=None)
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads of every stage process (OMP_NUM_THREADS for the jobs it starts); on a "
                        "shared CPU machine 1 per concurrent job avoids threads stalling each other")
    r.add_argument("--rerun", metavar="KIND[,KIND]",
                   help="re-run the stages of these kinds (e.g. sample,evaluate), and so their dependents")
    r.add_argument("--track", action="store_true",
                   help="log training curves and final metrics to TensorBoard (the spec's tracking: section, else "
                        "results/<study>/tracking); changes no stage id")
    r.set_defaults(fn=cmd_run)
    target_help = "a spec file or a study results directory"
    v = sub.add_parser("verify", parents=[common], help="check records and artefacts (sizes, sha256) of a study; runs nothing")
    _spec_args(v, "target", target_help)
    v.set_defaults(fn=cmd_verify)
    c = sub.add_parser("clean", parents=[common], help="remove stage folders of a study (asks first; --yes when not on a terminal)")
    _spec_args(c, "target", target_help)
    c.add_argument("--kind", metavar="KIND[,KIND]", help="only the stages of these kinds")
    c.add_argument("--failed", action="store_true", help="only stages whose last attempt failed")
    c.add_argument("--yes", action="store_true", help="do not ask")
    c.set_defaults(fn=cmd_clean)
    s = sub.add_parser("status", parents=[common], help="done / running / failed / pending stages of a study")
    _spec_args(s, "target", target_help)
    s.add_argument("--follow", action="store_true", help="keep updating until every stage is done, failed or blocked")
    s.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between updates (--follow)")
    s.add_argument("--max-updates", type=_positive_int, default=None, help=argparse.SUPPRESS)  # bounds tests
    s.set_defaults(fn=cmd_status)
    p = sub.add_parser("report", parents=[common], help="tables and figures of a study")
    _spec_args(p, "target", target_help)
    p.add_argument("--out", help="output directory (default: <study>/report)")
    p.set_defaults(fn=cmd_report)
    sp = sub.add_parser("samples", parents=[common], help="print decoded samples of every run")
    _spec_args(sp, "target", target_help)
    sp.add_argument("-n", type=int, default=2, help="samples per run")
    sp.add_argument("--chars", type=int, default=300, help="characters per sample")
    sp.set_defaults(fn=cmd_samples)
    e = sub.add_parser("eval", parents=[common],
                       help="score external samples (.jsonl of texts, .npy of ids) with a study's metrics")
    e.add_argument("files", nargs="+", help="sample files: .jsonl ({\"text\": ...} per line) or .npy ((N, L) ids)")
    e.add_argument("--spec", required=True, help="the study (a spec file or its results directory); run it first")
    e.add_argument("--label", action="append", help="row label per file, in order (default: the file stem)")
    e.set_defaults(fn=cmd_eval)
    from fsdfm.cli_ls import add_ls_parser
    add_ls_parser(sub, common)
    return ap


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    from fsdfm.cache import pin_cache_env
    pin_cache_env()  # the jobs this run starts may run in another directory
    try:
        return _main(argv)
    except BrokenPipeError:
        # `fsdfm ... | head`: the reader is gone; exit quietly (and keep Python from complaining at shutdown)
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        set_thread_env(args.threads)  # before the imports below load numpy and torch
    from fsdfm.data import DataError
    from fsdfm.registry import UnknownNameError
    from fsdfm.study.spec import SpecError
    from fsdfm.study.graph import PlanError
    try:
        result = args.fn(args)
    except (SpecError, DataError, UnknownNameError, PlanError, InputError, UsageError, FileNotFoundError) as e:
        print(f"fsdfm {args.cmd}: error: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 2
    print(json.dumps(result, default=str), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
