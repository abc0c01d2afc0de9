"""Keeping declared versions honest: a committed table of source digests per versioned unit.

Every stage kind (`@stage_kind(..., version=..., sources=...)`) and every metric (`METRICS`,
`@register_metric(..., version=..., sources=...)`) carries a declared version string that enters the ids of the
stages that compute it (see `fsdfm.fingerprint` for why declared strings and not hashes of the code), and its
*sources*, declared beside it: modules, or `module:function` for one function of a shared module (default: the
unit's own function). This module only checks: it walks the registries (found by discovery, so a new unit needs
no edit here). tests/fixtures/code_versions.json holds, per unit,
its version and the sha256 of each source as of the last refresh. `check()` (run by tests/test_versions.py)
fails when

* a unit's sources changed while its version did not: "bump the version of X" -- or, when its results cannot
  change (a comment, a rename, a refactor), refresh the table, which a reviewer then sees in the diff;
* a version changed, a unit was added or removed, and the table was not refreshed.

Refresh with `python -m fsdfm.versions --write` (prints what changed; ends with one JSON line).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fsdfm.io import atomic_write_json
from fsdfm.registry import discover
from fsdfm.study.graph import STAGE_KINDS

TABLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "code_versions.json"


@dataclass(frozen=True)
class Unit:
    """One versioned unit: `name` ("stage:<kind>" or "metric:<name>"), its declared `version`, the sha256 of
    each of its sources (`digests`: ref -> hex) and where its version is declared (`where`)."""

    name: str
    version: str
    digests: dict
    where: str


def source_digest(ref: str) -> str:
    """sha256 of a source: a module's file bytes ("fsdfm.model") or one object's source ("fsdfm.methods.common:fn")."""
    module, _, attr = ref.partition(":")
    discover(module, submodules=False)  # imports it (the one function that imports by name)
    mod = sys.modules[module]
    if attr:
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
        text = inspect.getsource(obj).encode()
    else:
        text = Path(mod.__file__).read_bytes()
    return hashlib.sha256(text.replace(b"\r\n", b"\n")).hexdigest()


# every package whose modules register stage kinds or metrics (fsdfm.external: `fsdfm eval`'s stage)
UNIT_PACKAGES = ("fsdfm.methods", "fsdfm.metrics", "fsdfm.external")


def current_units() -> tuple[dict[str, Unit], list[str]]:
    """Every versioned unit of the installed code ({name: Unit}) and the problems found while collecting them
    (a unit without declared sources, a source that does not import)."""
    from fsdfm.metrics.registry import METRICS  # heavy: torch

    discover(*UNIT_PACKAGES)
    declared = {}
    for kind in STAGE_KINDS.names():
        k = STAGE_KINDS.get(kind)
        if k.module.startswith("fsdfm."):  # the package's own kinds (tests and plugins register their own)
            declared[f"stage:{kind}"] = (k.version, k.sources, f"@stage_kind({kind!r}, ...) in {k.module}")
    for name in METRICS.names():
        m = METRICS.get(name)
        if m.compute is None or m.compute.__module__.startswith("fsdfm."):
            declared[f"metric:{name}"] = (m.version, m.sources, f"register_metric({name!r}, ...) (fsdfm.metrics)")
    units, problems = {}, []
    for name, (version, refs, where) in sorted(declared.items()):
        if not refs:
            problems.append(
                f"{name}: no sources declared: list the modules/functions that compute it in its "
                f"`sources=` ({where}), then run python -m fsdfm.versions --write"
            )
            continue
        digests = {}
        for ref in refs:
            try:
                digests[ref] = source_digest(ref)
            except (ImportError, AttributeError, OSError, TypeError) as e:
                problems.append(
                    f"{name}: source {ref!r} cannot be read ({type(e).__name__}: {e}); fix its `sources=` ({where})"
                )
        units[name] = Unit(name, version, digests, where)
    return units, problems


def compare(table: dict, units: dict[str, Unit]) -> list[str]:
    """Problems between the committed `table` ({name: {"version", "sources": {ref: hex}}}) and `units`."""
    refresh = "python -m fsdfm.versions --write"
    out = []
    for name, u in sorted(units.items()):
        row = table.get(name)
        if row is None:
            out.append(f"{name}: not in {TABLE.name}: add it with {refresh}")
            continue
        if row.get("version") != u.version:
            out.append(f"{name}: version {row.get('version')!r} -> {u.version!r} is not in {TABLE.name}: {refresh}")
            continue
        old = row.get("sources") or {}
        changed = sorted(r for r in set(old) | set(u.digests) if old.get(r) != u.digests.get(r))
        if changed:
            out.append(
                f"{name}: its sources changed ({', '.join(changed)}) but its version is still {u.version!r}: "
                f"bump the version of {name} ({u.where}) if its results can change; if they cannot "
                f"(a comment, a refactor), refresh the table with {refresh}"
            )
    for name in sorted(set(table) - set(units)):
        out.append(f"{name}: in {TABLE.name} but no longer a versioned unit: {refresh}")
    return out


def read_table(path: Path = TABLE) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def check(path: Path = TABLE) -> list[str]:
    """Every problem with the declared versions (empty: all versions are honest)."""
    units, problems = current_units()
    return problems + compare(read_table(path), units)


def write(path: Path = TABLE) -> dict:
    """Refresh the table from the current code; returns the names of the units whose rows changed."""
    units, problems = current_units()
    if problems:
        raise SystemExit("\n".join(problems))
    old = read_table(path)
    table = {n: {"version": u.version, "sources": u.digests} for n, u in sorted(units.items())}
    atomic_write_json(path, table)
    return {"changed": sorted(n for n in set(old) | set(table) if old.get(n) != table.get(n))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsdfm.versions", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"refresh {TABLE} from the current code")
    args = ap.parse_args(argv)
    if args.write:
        res = write()
        for n in res["changed"]:
            print(f"  refreshed {n}")
        print(f"{TABLE}: {len(res['changed'])} units refreshed")
        print(json.dumps({"ok": True, "table": str(TABLE), **res}))
        return 0
    problems = check()
    for p in problems:
        print(f"  {p}")
    print(f"{TABLE}: {'up to date' if not problems else f'{len(problems)} problems'}")
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
