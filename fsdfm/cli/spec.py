"""The study a command line names: SPEC with its KEY=VALUE overrides and --limit (fsdfm/study/overrides.py), or a
study directory; `--print-config`."""

from __future__ import annotations

import shlex
from pathlib import Path

from fsdfm.cli.common import UsageError
from fsdfm.records import data_cache_dir
from fsdfm.study.dump import dump_yaml
from fsdfm.study.load import load
from fsdfm.study.overrides import parse_overrides
from fsdfm.study.spec import check_name, read_yaml


def resolve_spec(args, check_files: bool = True):
    """args.spec / args.target with the command line's overrides and --limit (fsdfm.study.load.load)."""
    spec_path = getattr(args, "spec", None) or args.target
    root = args.results
    # the data checks may reuse (never write) the tokenizers a previous run cached under the results root
    return load(
        spec_path,
        parse_overrides(getattr(args, "overrides", None) or []),
        getattr(args, "limit", None),
        cache_dir=data_cache_dir(root),
        check_files=check_files,
    )


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
    """SPEC KEY=VALUE ... --limit N as typed (for the "next:" hints)."""
    words = [getattr(args, "spec", None) or args.target, *(getattr(args, "overrides", None) or [])]
    if getattr(args, "limit", None) is not None:
        words += ["--limit", str(args.limit)]
    return " ".join(shlex.quote(w) for w in words)


def print_config(resolved, sdir: Path) -> dict:
    """--print-config: the spec after --limit and the overrides with every default resolved (each method kind's
    own settings included: `fsdfm.study.dump.resolved_config`), as YAML; nothing is run or written."""
    print(
        f"# study {resolved.name} -> {sdir}  (from {resolved.path}"
        + (f", --limit {resolved.limit}" if resolved.limit is not None else "")
        + "; every default filled in, base: merged; the grid applies on top)"
    )
    print(dump_yaml(resolved.spec, resolved.raw))
    return {"study": resolved.name, "print_config": True, "overrides": resolved.overrides, "limit": resolved.limit}
