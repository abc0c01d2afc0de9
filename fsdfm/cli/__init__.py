"""Command line: `fsdfm run SPEC`, `fsdfm status SPEC|DIR`, `fsdfm report SPEC|DIR`, `fsdfm samples SPEC|DIR`,
`fsdfm verify SPEC|DIR`, `fsdfm clean SPEC|DIR`, `fsdfm ls`, `fsdfm eval FILES --spec SPEC`,
`fsdfm compare STUDY_OR_SPEC...`.

Every command prints for humans and ends with one JSON line for machines. Bad input (a malformed spec,
a missing file, an unknown name) is one message naming what and where, exit status 2, nothing written.

The package: `common` (errors, argument types, threads), `spec` (resolving SPEC|DIR and overrides), one module per
command family (`run`, `status`, `report` (report, samples, eval), `verify` (verify, clean), `ls`, `compare`); this module
builds the parser and turns errors into exit statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from fsdfm.io import STORAGE_ADVICE, storage_error
from fsdfm.cli.common import (
    DEFAULT_ROOT,
    InputError,
    UsageError,
    THREAD_ENV,
    THREADS_SOURCE_ENV,
    _offline_defaults,
    _positive_int,
    auto_threads,
    set_thread_env,
)
from fsdfm.cli.compare import cmd_compare
from fsdfm.cli.ls import add_ls_parser
from fsdfm.cli.report import cmd_eval, cmd_report, cmd_samples
from fsdfm.cli.run import cmd_run
from fsdfm.cli.status import cmd_status
from fsdfm.cli.verify import cmd_clean, cmd_verify
from fsdfm.records import pin_cache_env
from fsdfm.registry import UnknownNameError
from fsdfm.study.graph import PlanError
from fsdfm.study.spec import SpecError

__all__ = ["main", "build_parser", "InputError", "UsageError", "DEFAULT_ROOT"]


def _spec_args(p: argparse.ArgumentParser, target: str, help_: str) -> None:
    """SPEC (or a study directory), then KEY=VALUE overrides and --limit: the same study for every command."""
    p.add_argument(target, help=help_)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="spec overrides (a.b=1, methods.fsdfm.distill.K=8), sweeps (seed=0,1,2, grid.KEY=[...]); "
        "see fsdfm/study/overrides.py",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="smoke run: N samples per run, training shrunk as the spec's limit: section says "
        "(its own study, <name>+limit-N)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fsdfm", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=DEFAULT_ROOT, help="results root (default: results)")
    # --results also after the subcommand: SUPPRESS keeps the top-level value unless it is given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", default=argparse.SUPPRESS, help="results root (default: results)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run_parser(sub, common)
    _add_study_parsers(sub, common)
    _add_compare_parser(sub, common)
    add_ls_parser(sub, common)
    return ap


def _add_compare_parser(sub, common: argparse.ArgumentParser) -> None:
    cmp = sub.add_parser(
        "compare", parents=[common], help="one table across studies by setting, with the significance rules"
    )
    cmp.add_argument("studies", nargs="+", metavar="STUDY_OR_SPEC", help="study folders, spec files or results.json")
    cmp.add_argument("--metrics", metavar="M[,M]", help="columns (default: the main table's metrics)")
    cmp.add_argument("--out", help="also write table_compare.{md,tex,csv} here")
    cmp.set_defaults(fn=cmd_compare)


def _add_run_parser(sub, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("run", parents=[common], help="run (or --dry-run) a study spec")
    _spec_args(r, "spec", "a study spec (experiments/*.yaml)")
    r.add_argument("--dry-run", action="store_true", help="print the runs and stages with their ids and done state")
    r.add_argument(
        "--print-config",
        action="store_true",
        help="print the spec with the overrides and --limit applied and every default filled in (YAML) and exit; "
        "runs nothing",
    )
    r.add_argument(
        "--executor",
        default="local",
        help="local (default: submitit local processes), local_gpus (one process per GPU, see --devices), inline "
        "(in this process, with progress bars), debug (in-process, for tests) or slurm",
    )
    r.add_argument(
        "--devices",
        metavar="0,1,...",
        help="GPUs of --executor local_gpus, one stage at a time on each (a GPU named twice runs two); default: "
        "$FSDFM_DEVICES, else $CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists",
    )
    r.add_argument("--profile", help="cluster profile YAML for --executor slurm (e.g. slurm/local.yaml)")
    r.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return (slurm); exits 0 once the submission succeeded (then: fsdfm status)",
    )
    r.add_argument(
        "--max-parallel", type=_positive_int, default=None, metavar="N", help="at most N stages at once (N >= 1)"
    )
    r.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads of every stage process (OMP_NUM_THREADS for the jobs it starts); on a "
        "shared CPU machine 1 per concurrent job avoids threads stalling each other",
    )
    r.add_argument(
        "--rerun",
        metavar="KIND[,KIND]",
        help="re-run the stages of these kinds (e.g. sample,evaluate), and so their dependents",
    )
    r.add_argument(
        "--track",
        action="store_true",
        help="log training curves and final metrics to TensorBoard (the spec's tracking: section, else "
        "results/<study>/tracking); changes no stage id",
    )
    r.set_defaults(fn=cmd_run)


def _add_study_parsers(sub, common: argparse.ArgumentParser) -> None:
    """verify, clean, status, report, samples and eval: the commands that read (or clean) one study."""
    target_help = "a spec file or a study results directory"
    v = sub.add_parser(
        "verify", parents=[common], help="check records and artefacts (sizes, sha256) of a study; runs nothing"
    )
    _spec_args(v, "target", target_help)
    v.set_defaults(fn=cmd_verify)
    c = sub.add_parser(
        "clean", parents=[common], help="remove stage folders of a study (asks first; --yes when not on a terminal)"
    )
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
    p.add_argument(
        "--records",
        action="store_true",
        help="also copy the light records (plan, record.json, per_sample.csv) to <out>/records/, to commit",
    )
    p.set_defaults(fn=cmd_report)
    sp = sub.add_parser("samples", parents=[common], help="print decoded samples of every run")
    _spec_args(sp, "target", target_help)
    sp.add_argument("-n", type=int, default=2, help="samples per run")
    sp.add_argument("--chars", type=int, default=300, help="characters per sample")
    sp.set_defaults(fn=cmd_samples)
    e = sub.add_parser(
        "eval", parents=[common], help="score external samples (.jsonl of texts, .npy of ids) with a study's metrics"
    )
    e.add_argument("files", nargs="+", help='sample files: .jsonl ({"text": ...} per line) or .npy ((N, L) ids)')
    e.add_argument("--spec", required=True, help="the study (a spec file or its results directory); run it first")
    e.add_argument("--label", action="append", help="row label per file, in order (default: the file stem)")
    # defaults in fsdfm.external.EvalLimits (not imported here: it loads numpy before --threads is applied)
    for flag, what in (
        ("--max-file-bytes", "bytes per file (default 1 GiB)"),
        ("--max-line-bytes", "bytes per .jsonl line (default 1 MiB)"),
        ("--max-samples", "texts or rows per file (default 100,000)"),
    ):
        e.add_argument(flag, type=int, metavar="N", help=f"refuse more than N {what}")
    e.set_defaults(fn=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    pin_cache_env()  # the jobs this run starts may run in another directory
    try:
        return _main(argv)
    except BrokenPipeError:
        # `fsdfm ... | head`: the reader is gone; exit quietly (and keep Python from complaining at shutdown)
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, with KEY=VALUE overrides accepted anywhere after the spec (`fsdfm run SPEC --dry-run
    seed=3`, as Hydra users type them): argparse takes the positional run before the first flag, the rest are
    collected here. Anything else left over is argparse's "unrecognized arguments" error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [w for w in extra if "=" in w and not w.startswith("-")]
    rest = [w for w in extra if w not in late]
    if late and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *late]
    elif late:
        rest = extra
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:
        return 130
    if getattr(args, "threads", None) is not None:
        set_thread_env(args.threads)  # before the imports below load numpy and torch
        os.environ[THREADS_SOURCE_ENV] = f"--threads {args.threads}"
    elif getattr(args, "cmd", None) == "run" and args.executor != "slurm" and not any(map(os.environ.get, THREAD_ENV)):
        # no choice made: a count that does not oversubscribe the machine (a SLURM job has its own cpus-per-task)
        args.auto_threads, why = auto_threads(args.max_parallel)
        set_thread_env(args.auto_threads)
        os.environ[THREADS_SOURCE_ENV] = why
    elif getattr(args, "cmd", None) == "run" and any(map(os.environ.get, THREAD_ENV)):
        os.environ[THREADS_SOURCE_ENV] = "OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS"))
    from fsdfm.data import DataError  # heavy: torch, imported after the thread variables are set

    try:
        result = args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C in a command with nothing to stop (`fsdfm run` handles its own): one line
        print(f"fsdfm {args.cmd}: interrupted by SIGINT", file=sys.stderr)
        print(json.dumps({"ok": False, "interrupted": "SIGINT"}), flush=True)
        return 130
    except (SpecError, DataError, UnknownNameError, PlanError, InputError, UsageError, FileNotFoundError) as e:
        print(f"fsdfm {args.cmd}: error: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 2
    except OSError as e:
        if e.errno not in STORAGE_ADVICE:
            raise
        # the environment (disk full, read-only results root, no permission): one line naming the path, exit 2
        msg = str(storage_error(e, e.filename or args.results))
        print(f"fsdfm {args.cmd}: error: {msg}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": msg}), flush=True)
        return 2
    print(json.dumps(result, default=str), flush=True)
    return 0 if result.get("ok", True) else 1
