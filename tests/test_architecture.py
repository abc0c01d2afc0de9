"""The architecture the folder layout promises, checked on the source (issue 12).

Walks every `import` in fsdfm/ with `ast` (module level and inside functions alike: an import deferred into a
function to dodge a cycle is still a cycle) and fails on

* a cycle between fsdfm modules (package `__init__` files count as the package's module);
* an upward import: a module of a lower floor importing one of a higher floor (`LAYERS`);
* a module far over the length one sitting can read (`MAX_LINES`).

Imports under `if TYPE_CHECKING:` are annotations only and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fsdfm"
MAX_LINES = 420

# floors, lowest first: a module may import from its own floor and the floors below it, never above
LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves: writing files, registries, progress bars, training-curve logging, memory probes
    ("io", "registry", "progress", "tracking", "memory"),
    # the library floor: maths, models, samplers, data (knows nothing of studies, stages or records)
    (
        "schedulers",
        "paths",
        "losses",
        "model",
        "samplers",
        "sparse_step",
        "sampling",
        "objectives",
        "teachers",
        "train",
        "distributed",
        "ar",
        "flm",
        "fmlm",
        "oracle_posterior",
        "data",
        "released_checkpoints",
    ),
    ("metrics",),  # measuring samples and models
    ("study", "fingerprint"),  # spec schema and the stage graph (no method code)
    ("records",),  # the on-disk layout: the only place that knows it
    ("methods",),  # method kinds and their stage bodies
    ("launch", "external"),  # running stages: executors, SLURM, status; importing external samples
    ("versions",),  # the declared-versions check over every stage kind and metric
    ("report",),  # analysis: reads records and plans only
    ("api",),  # the Python API
    ("cli",),  # the command line
)
FLOOR = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    """The fsdfm module `name` refers to (its longest prefix that is a module), or None outside fsdfm."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def imports_of(module: str) -> set[str]:
    """The fsdfm modules `module` imports."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.add(_resolve(a.name))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, base] if base else up)
                for a in child.names:
                    # `from pkg import sub` names the submodule when there is one
                    out.add(_resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in MODULES else _resolve(base))
            visit(child)

    visit(tree)
    out.discard(None)
    out.discard(module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOOR.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in MODULES if m != "fsdfm" and floor_of(m) is None)
    assert not unplaced, f"modules on no floor of LAYERS (add them where they belong): {unplaced}"


def test_no_upward_import():
    upward = sorted(
        f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if floor_of(m) is not None and floor_of(d) is not None and floor_of(d) > floor_of(m)
    )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path [a, b, ..., a], or [] (iterative DFS, white/grey/black)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return []


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_known_cycle():
    # the checker itself: a known 3-cycle is found, a DAG has none
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_readable_in_one_sitting(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (more than {MAX_LINES}): split it by concept"
