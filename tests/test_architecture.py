"""The architecture the folder layout promises, checked on the source (issue 12).

Walks every `import` in fsdfm/ with `ast` (module level and inside functions alike: an import deferred into a
function to dodge a cycle is still a cycle) and fails on

* a cycle between fsdfm modules (package `__init__` files count as the package's module);
* an upward import: a module of a lower floor importing one of a higher floor (`LAYERS`), where a registry's
  discovery counts as an import: `Registry(..., discover=("fsdfm.x", ...))` and `discover("fsdfm.x")` are edges
  from the module that declares them to the packages they scan (not for the cycle check: discovery runs on the
  first lookup, after every module has loaded);
* an import by name (`importlib.import_module`, `__import__`) anywhere but `fsdfm.registry.discover`;
* a module far over the length one sitting can read (`MAX_LINES`);
* a function of the orchestration floors (and the report) longer than `MAX_FUNCTION_LINES` (issue 22: split it into named steps);
* an fsdfm import inside a function of the orchestration floors without a comment saying what forces it there
  ("heavy: ..." a heavy dependency such as torch that the importing module keeps out, or "cycle: ...").

Imports under `if TYPE_CHECKING:` are annotations only and are not edges. A top-level module that no floor lists
(a new library module such as `fsdfm/sdtt.py`) is on the library floor and checked as such.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fsdfm"
MAX_LINES = 420
MAX_FUNCTION_LINES = 80
# the floors that drive the library (plan, record, run, report on studies): their functions stay short
ORCHESTRATION = ("study", "fingerprint", "records", "methods", "launch", "external", "versions", "api", "cli")
SHORT_FUNCTION_FLOORS = (*ORCHESTRATION, "report")  # the report's tables and figures too
# "module:function" allowed over MAX_FUNCTION_LINES, each named with its reason in the README (none today)
LONG_FUNCTION_EXCEPTIONS: frozenset[str] = frozenset()

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
        "objectives",
        "teachers",
        "train",
        "distributed",
        "ar",
        "flm",
        "fmlm",
        "oracle_posterior",
        "oracle_joint",
        "oracle_law",
        "convergence",
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
LIBRARY_FLOOR = FLOOR["samplers"]  # where an unlisted top-level module sits
DISCOVERY = ("fsdfm.registry", "discover")  # the one function that may import a module by name


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


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _strings(node: ast.AST) -> list[str]:
    """The string constants in `node` (a literal, or a tuple/list of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def discovery_of(module: str) -> set[str]:
    """The fsdfm packages `module` declares a registry's discovery of (`Registry(..., discover=...)`, `discover(...)`)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) == "Registry":
            out.update(s for kw in node.keywords if kw.arg == "discover" for s in _strings(kw.value))
        elif isinstance(node, ast.Call) and _callee(node) == "discover":
            out.update(s for a in node.args for s in _strings(a))
    return {_resolve(s) for s in out if s.startswith("fsdfm.") and _resolve(s)} - {module}


def imports_by_name(module: str) -> list[str]:
    """Where `module` imports a module by name (`import_module(...)`, `__import__(...)`), as "module:function"."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[str] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call) and _callee(child) in ("import_module", "__import__"):
                if (module, func) != DISCOVERY:
                    found.append(f"{module}:{func or '<module>'} line {child.lineno}")
            visit(child, name)

    visit(tree, "")
    return found


GRAPH = {m: imports_of(m) for m in MODULES}
DISCOVERED = {m: discovery_of(m) for m in MODULES}


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOOR.get(parts[1], LIBRARY_FLOOR) if len(parts) > 1 else None


def test_an_unlisted_top_level_module_is_on_the_library_floor():
    # a new library module (fsdfm/sdtt.py) needs no edit of LAYERS, and may not import a study, method, ... module
    assert floor_of("fsdfm.sdtt") == LIBRARY_FLOOR == floor_of("fsdfm.samplers")
    assert floor_of("fsdfm.sdtt") < floor_of("fsdfm.study.spec") < floor_of("fsdfm.methods.base")


def test_no_upward_import():
    upward = sorted(
        f"{m} (floor {floor_of(m)}) {how} {d} (floor {floor_of(d)})"
        for edges, how in ((GRAPH, "imports"), (DISCOVERED, "discovers"))
        for m, deps in edges.items()
        for d in deps
        if floor_of(m) is not None and floor_of(d) is not None and floor_of(d) > floor_of(m)
    )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_discovery_edges():
    # the kinds' registry (fsdfm.methods.base) discovers its own package; the checker sees that edge, and would see
    # a schema module's discovery of fsdfm.methods as an upward edge
    assert "fsdfm.methods" in DISCOVERED["fsdfm.methods.base"]
    assert "fsdfm.metrics" in DISCOVERED["fsdfm.metrics.registry"]
    assert floor_of("fsdfm.study.spec") < floor_of("fsdfm.methods")


def test_only_discovery_imports_by_name():
    by_name = [hit for m in MODULES for hit in imports_by_name(m)]
    assert not by_name, "imports by name outside fsdfm.registry.discover:\n" + "\n".join(by_name)
    assert not imports_by_name("fsdfm.registry")  # the one place that may, and does
    assert "import_module" in MODULES["fsdfm.registry"].read_text()


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


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function (methods and nested ones too) of `source` longer than `limit` lines,
    counted from its `def` (decorators excluded) to its last line, docstring included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append((node.name, n))
    return out


def test_long_functions_counts_lines_from_def_to_end():
    # the checker itself: a 3-line function passes a limit of 3 and fails a limit of 2; nested ones count too
    src = "@dec\ndef f(x):\n    y = x\n    return y\n\n\ndef g():\n    def h():\n        return 1\n    return h\n"
    assert long_functions(src, 3) == [("g", 4)]
    assert sorted(long_functions(src, 2)) == [("f", 3), ("g", 4)]


def test_orchestration_functions_are_short():
    long = sorted(
        f"{m}:{name} ({n} lines)"
        for m, path in MODULES.items()
        if floor_of(m) is not None and m.split(".")[1] in SHORT_FUNCTION_FLOORS
        for name, n in long_functions(path.read_text(), MAX_FUNCTION_LINES)
        if f"{m}:{name}" not in LONG_FUNCTION_EXCEPTIONS
    )
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)


def deferred_imports(source: str) -> list[tuple[int, str]]:
    """(line, text) of every fsdfm import inside a function of `source`, the text its first line."""
    lines = source.splitlines()
    out = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                if isinstance(node, ast.Import):
                    mod = node.names[0].name
                if mod and (mod == "fsdfm" or mod.startswith("fsdfm.")):
                    out.append((node.lineno, lines[node.lineno - 1].strip()))
    return sorted(set(out))


def test_deferred_imports_finds_imports_inside_functions_only():
    src = "from fsdfm.io import x\n\ndef f():\n    import fsdfm.methods  # heavy: torch\n    import os\n    return x\n"
    assert deferred_imports(src) == [(4, "import fsdfm.methods  # heavy: torch")]


def test_every_deferred_import_says_why():
    unexplained = sorted(
        f"{MODULES[m]}:{line}: {text}"
        for m in MODULES
        if floor_of(m) is not None and m.split(".")[1] in ORCHESTRATION
        for line, text in deferred_imports(MODULES[m].read_text())
        if not any(w in text for w in ("heavy:", "cycle:"))
    )
    assert not unexplained, (
        "fsdfm imports inside functions go to the module top, unless a cycle or a heavy dependency forces "
        "them there; then a comment says which ('# heavy: torch', '# cycle: ...'):\n" + "\n".join(unexplained)
    )
