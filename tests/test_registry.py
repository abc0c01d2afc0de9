"""fsdfm.registry: a discovering registry holds exactly what the modules of its packages declare.

The property replaces tests that pinned whole registries to a typed-out list (a new metric, rule or kind then meant
editing a test). Two fresh processes compute the same sets independently:
  declared    every module file under fsdfm/ imported by path (a filesystem walk, not pkgutil), then each
              discovering registry's entries read without a lookup (so discovery never runs);
  discovered  only the registry's own module imported, then `names()`, whose first lookup runs discovery.
A module that discovery misses (a package without `__init__`, a registration at the wrong level) makes them differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsdfm.registry import Registry, UnknownNameError

REPO = Path(__file__).resolve().parents[1]

DECLARED = r"""
import importlib, json, re, sys
from pathlib import Path
from fsdfm.registry import Registry
pkg = Path(sys.argv[1])
for path in sorted(pkg.rglob("*.py")):
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    if name.endswith("__main__"):
        continue
    importlib.import_module(name)
found = {}
for mod_name, mod in list(sys.modules.items()):
    if not mod_name.startswith("fsdfm") or not getattr(mod, "__file__", None):
        continue
    source = Path(mod.__file__).read_text()
    for attr, value in list(vars(mod).items()):
        # a discovering registry, counted in the module that defines it (not where it is re-exported)
        if isinstance(value, Registry) and value._packages and re.search(rf"^{attr}\b.*= Registry\(", source, re.M):
            found[f"{mod_name}:{attr}"] = sorted(value._items)
print(json.dumps(found))
"""

DISCOVERED = """
import importlib, json, sys
out = {}
for ref in sys.argv[1:]:
    mod_name, attr = ref.split(":")
    out[ref] = getattr(importlib.import_module(mod_name), attr).names()
print(json.dumps(out))
"""


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def declared() -> dict:
    return _run(DECLARED, str(REPO / "fsdfm"))


def test_every_discovering_registry_holds_exactly_what_its_packages_declare(declared):
    # the discovering registries of fsdfm (found, not listed: any Registry(..., discover=...) at module level)
    refs = sorted(declared)
    assert {r.split(":")[1] for r in refs} >= {"METRICS", "METHOD_KINDS", "UPDATE_RULES", "EXECUTORS"}
    discovered = _run(DISCOVERED, *refs)
    for ref in refs:
        assert declared[ref], f"{ref}: nothing declared"
        assert discovered[ref] == declared[ref], f"{ref}: discovery differs from the declarations"


def test_a_lookup_runs_discovery_once_and_a_miss_suggests_a_name():
    reg: Registry = Registry("thing", discover=("fsdfm.registry",))  # a package-less module: nothing to scan
    reg.register("euler", 1)
    assert reg.names() == ["euler"] and reg._discovered
    with pytest.raises(UnknownNameError, match="did you mean 'euler'"):
        reg.get("eulr")
