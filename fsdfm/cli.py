"""Command line: `fsdfm run SPEC`, `fsdfm status SPEC|DIR`, `fsdfm report SPEC|DIR`, `fsdfm samples SPEC|DIR`.

Every command prints for humans and ends with one JSON line for machines. Bad input (a malformed spec,
a missing file, an unknown name) is one message naming what and where, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_ROOT = "results"


def _offline_defaults() -> None:
    # The suite never downloads at run time unless asked: a hub lookup would otherwise retry for ~30 s.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _load(spec_path: str):
    from fsdfm.methods import plan_study
    from fsdfm.specs import load_spec

    spec, cells = load_spec(spec_path)
    return spec, plan_study(spec.name, cells)


def _study_dir(target: str, root: str) -> Path:
    """A spec file -> results/<its name>; a directory -> itself."""
    p = Path(target)
    if p.is_dir():
        return p
    from fsdfm.specs import read_yaml
    name = read_yaml(p).get("name")
    if not isinstance(name, str):
        from fsdfm.specs import SpecError
        raise SpecError(f"{p}: name: a spec needs a study name")
    return Path(root) / name


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def set_threads(n: int) -> None:
    """n intra-op threads here (inline and debug executors) and in every job this process starts (submitit local
    processes and SLURM jobs inherit the environment)."""
    import torch

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(n)
    torch.set_num_threads(n)


def cmd_run(args) -> dict:
    import fsdfm.pipeline  # noqa: F401  (registers the stage kinds)
    from fsdfm.launch import execute
    from fsdfm.results import is_done
    from fsdfm.stages import waves

    spec, plan = _load(args.spec)
    sdir = Path(args.results) / spec.name
    if args.threads is not None:
        set_threads(args.threads)
    if args.dry_run:
        print(f"study {spec.name}: {len(plan.runs)} runs, {len(plan.stages)} stages  ({args.spec})")
        for i, wave in enumerate(waves(plan)):
            for s in wave:
                done = is_done(sdir / "stages" / s.id)
                print(f"  wave {i}  {'done   ' if done else 'pending'}  {s.id}  <- {', '.join(s.inputs.values()) or '-'}")
        print("runs:")
        for r in plan.runs:
            print(f"  {r.run_id}  -> {r.stage_id}")
        return {"study": spec.name, "dry_run": True, "runs": len(plan.runs), "stages": len(plan.stages),
                "done": sum(is_done(sdir / "stages" / s) for s in plan.stages)}
    profile = args.profile or (spec.cluster.get("profile") if args.executor == "slurm" else None)
    print(f"study {spec.name}: {len(plan.runs)} runs, {len(plan.stages)} stages -> {sdir}  (executor: {args.executor})",
          flush=True)
    from fsdfm.launch import DriverInterrupted

    try:
        summary = execute(plan, args.results, executor=args.executor, profile=profile, wait=not args.no_wait,
                          max_parallel=args.max_parallel)
    except DriverInterrupted as e:  # SIGTERM/SIGHUP: the executor has cancelled its jobs and released the locks
        print(f"fsdfm run: {e}; its jobs were stopped. Re-run to resume: fsdfm run {args.spec}", file=sys.stderr)
        print(json.dumps({"study": spec.name, "ok": False, "interrupted": signal_name(e.signum), "results": str(sdir)}))
        raise SystemExit(128 + e.signum) from None
    print(summary.format())
    # --no-wait: a submission that succeeded is a success (its stages are pending by design); see `fsdfm status`
    ok = summary.ok or (args.no_wait and not summary.failed and not summary.blocked)
    if summary.ok:
        print(f"results: {sdir}   next: fsdfm report {args.spec}")
    elif ok:
        print(f"submitted: {len(summary.submitted)} jobs   next: fsdfm status {args.spec}")
    return {"study": spec.name, "ok": ok, "done": len(summary.done), "skipped": len(summary.skipped),
            "failed": len(summary.failed), "blocked": len(summary.blocked), "pending": len(summary.pending),
            "submitted": len(summary.submitted), "results": str(sdir)}


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def cmd_status(args) -> dict:
    from fsdfm.launch import status

    report = status(_study_dir(args.target, args.results))
    print(report.format())
    return {"study": report.study, **report.counts(), "runs_done": report.runs_done, "runs_total": report.runs_total}


def cmd_report(args) -> dict:
    from fsdfm.report import write_report

    sdir = _study_dir(args.target, args.results)
    out = write_report(sdir, Path(args.out) if args.out else sdir / "report")
    print(f"report: {out.index}")
    return {"study": sdir.name, "report": str(out.index), "tables": [str(p) for p in out.tables],
            "figures": [str(p) for p in out.figures]}


def cmd_samples(args) -> dict:
    """Print the first decoded samples of every evaluated run (method, rule, step budget)."""
    import json as _json

    from fsdfm.results import read_record

    sdir = _study_dir(args.target, args.results)
    plan = _json.loads((sdir / "plan.json").read_text())
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


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    ap = argparse.ArgumentParser(prog="fsdfm", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=DEFAULT_ROOT, help="results root (default: results)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or --dry-run) a study spec")
    r.add_argument("spec")
    r.add_argument("--dry-run", action="store_true", help="print the runs and stages with their ids and done state")
    r.add_argument("--executor", default="local", help="local (default: submitit local processes), inline (in this process, with progress bars), debug (in-process, for tests) or slurm")
    r.add_argument("--profile", help="cluster profile YAML for --executor slurm (e.g. slurm/local.yaml)")
    r.add_argument("--no-wait", action="store_true",
                   help="submit and return (slurm); exits 0 once the submission succeeded (then: fsdfm status)")
    r.add_argument("--max-parallel", type=int, default=None)
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads of every stage process (OMP_NUM_THREADS for the jobs it starts); on a "
                        "shared CPU machine 1 per concurrent job avoids threads stalling each other")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="done / running / failed / pending stages of a study")
    s.add_argument("target", help="a spec file or a study results directory")
    s.set_defaults(fn=cmd_status)
    p = sub.add_parser("report", help="tables and figures of a study")
    p.add_argument("target", help="a spec file or a study results directory")
    p.add_argument("--out", help="output directory (default: <study>/report)")
    p.set_defaults(fn=cmd_report)
    sp = sub.add_parser("samples", help="print decoded samples of every run")
    sp.add_argument("target", help="a spec file or a study results directory")
    sp.add_argument("-n", type=int, default=2, help="samples per run")
    sp.add_argument("--chars", type=int, default=300, help="characters per sample")
    sp.set_defaults(fn=cmd_samples)
    args = ap.parse_args(argv)
    from fsdfm.data import DataError
    from fsdfm.registry import UnknownNameError
    from fsdfm.specs import SpecError
    try:
        result = args.fn(args)
    except (SpecError, DataError, UnknownNameError, FileNotFoundError) as e:
        print(f"fsdfm {args.cmd}: error: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}))
        return 2
    print(json.dumps(result, default=str))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
