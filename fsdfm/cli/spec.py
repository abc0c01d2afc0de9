"""The study a command line names: SPEC with its KEY=VALUE overrides and --limit (fsdfm/study/overrides.py), or a
study directory; `--print-config`."""

from __future__ import annotations

import shlex
from pathlib import Path

from fsdfm.cli.common import DEFAULT_ROOT, UsageError
from fsdfm.study.overrides import parse_overrides
from fsdfm.study.spec import check_name, read_yaml


def resolve_spec(args, check_files: bool = True):
    """args.spec / args.target with the command line's overrides and --limit (`fsdfm.api.resolve_spec`)."""
    from fsdfm.api import resolve_spec as resolve  # heavy: torch (the kinds' checks); the CLI sets its threads first

    overrides = parse_overrides(getattr(args, "overrides", None) or [])
    spec = getattr(args, "spec", None) or args.target
    return resolve(spec, overrides, getattr(args, "limit", None), args.results, check_files=check_files)


def load_plan(args):
    """(the resolved spec, its plan) of `fsdfm run SPEC [overrides]`."""
    from fsdfm.methods import plan_study  # heavy: torch, imported after --threads set the thread variables

    r = resolve_spec(args)
    return r, plan_study(r.name, r.cells)


def study_dir(args) -> Path:
    """A spec file (with its overrides) -> results/<its study name>; a directory -> itself."""
    p = Path(args.target)
    has_overrides = bool(getattr(args, "overrides", None)) or getattr(args, "limit", None) is not None
    if p.is_dir():
        if has_overrides:
            raise UsageError(f"{p} is a study directory: overrides and --limit go with a spec file")
        return p
    if has_overrides:
        return Path(args.results) / resolve_spec(args, check_files=False).name
    return Path(args.results) / check_name(read_yaml(p).get("name"), "name", str(p))


def command_line(args) -> str:
    """SPEC KEY=VALUE ... --limit N [--results R] as typed: what names the study for every command (the "next:"
    hints of `run`, `eval`, `verify`; --results only where it is not the default)."""
    words = [getattr(args, "spec", None) or args.target, *(getattr(args, "overrides", None) or [])]
    if getattr(args, "limit", None) is not None:
        words += ["--limit", str(args.limit)]
    if str(getattr(args, "results", DEFAULT_ROOT)) != str(DEFAULT_ROOT):
        words += ["--results", str(args.results)]
    return " ".join(shlex.quote(w) for w in words)


def run_line(args) -> str:
    """`fsdfm run ...` as typed, with every option that shapes how it runs (--executor, --threads, --max-parallel,
    --profile, --no-wait, --track): the line that resumes an interrupted run. --rerun is left out (its stages were
    already discarded: repeating it would redo what the interrupted run finished), and so is --dry-run."""
    words = ["--executor", args.executor]
    for flag, value in (
        ("--threads", args.threads),
        ("--max-parallel", args.max_parallel),
        ("--profile", args.profile),
    ):
        if value is not None:
            words += [flag, str(value)]
    words += [flag for flag, on in (("--no-wait", args.no_wait), ("--track", args.track)) if on]
    return f"fsdfm run {command_line(args)} " + " ".join(shlex.quote(w) for w in words)


def print_config(resolved, sdir: Path) -> dict:
    """--print-config: the spec after --limit and the overrides with every default resolved (each method kind's
    own settings included: `fsdfm.methods.dump.resolved_config`), as YAML; nothing is run or written."""
    from fsdfm.methods.dump import dump_yaml  # heavy: torch (the kinds' registry); the CLI sets its threads first

    print(
        f"# study {resolved.name} -> {sdir}  (from {resolved.path}"
        + (f", --limit {resolved.limit}" if resolved.limit is not None else "")
        + "; every default filled in, base: merged; the grid applies on top)"
    )
    print(dump_yaml(resolved.spec, resolved.raw))
    return {"study": resolved.name, "print_config": True, "overrides": resolved.overrides, "limit": resolved.limit}
