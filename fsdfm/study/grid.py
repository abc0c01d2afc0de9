"""Method inheritance (`base:`), the grid (a cartesian product over dotted keys) and per-cell `overrides:`.

Knows: raw spec mappings (as read from YAML). Knows nothing of the validated dataclasses: each cell it
produces is validated by fsdfm.study.spec.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fsdfm.registry import did_you_mean
from fsdfm.study.yaml_io import SpecError, short


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_bases(methods: Any, file: str) -> dict:
    """Expand `base:` references between methods (deep merge, child wins); cycles are errors."""
    if not isinstance(methods, dict) or not methods:
        raise SpecError(f"{file}: methods: expected a non-empty mapping of method name -> settings")
    resolved: dict[str, dict] = {}

    def resolve(name: str, chain: tuple) -> dict:
        if name in resolved:
            return resolved[name]
        raw = methods[name]
        if not isinstance(raw, dict):
            raise SpecError(f"{file}: methods.{name}: expected a mapping, got {short(raw)}")
        base = raw.get("base")
        if base is not None and not isinstance(base, str):
            raise SpecError(f"{file}: methods.{name}.base: expected the name of a method, got {short(base)}")
        if base is None:
            out = dict(raw)
        else:
            if base not in methods:
                raise SpecError(
                    f"{file}: methods.{name}.base: unknown method {base!r}{did_you_mean(base, list(methods))}"
                )
            if base in chain:
                raise SpecError(f"{file}: methods.{name}.base: circular base chain {' -> '.join(chain + (base,))}")
            out = deep_merge(resolve(base, chain + (base,)), {k: v for k, v in raw.items() if k != "base"})
        out.pop("base", None)
        resolved[name] = out
        return out

    for name in methods:
        resolve(name, (name,))
    return resolved


def set_dotted(raw: dict, dotted: str, value: Any, file: str) -> None:
    keys = dotted.split(".")
    node = raw
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node.get(k, {}), dict):
            raise SpecError(f"{file}: grid key '{dotted}': '{'.'.join(keys[: i + 1])}' is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def grid_cells(raw: dict, file: str) -> list[dict]:
    """The cartesian product of `grid` (dotted key -> list of values), with `overrides` applied."""
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SpecError(f"{file}: grid: expected a mapping of dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(key, str) or not key or any(not k for k in key.split(".")):
            raise SpecError(f"{file}: grid: a key is a dotted field name such as 'sampling.seed', got {short(key)}")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{file}: grid.{key}: expected a non-empty list of values, got {short(values)}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] or [{}]


def cell_raw(raw: dict, cell: dict, file: str) -> dict:
    """The spec of one grid cell: the grid values and the matching overrides written into a copy."""
    out = copy.deepcopy({k: v for k, v in raw.items() if k not in ("grid", "overrides")})
    for key, value in cell.items():
        set_dotted(out, key, value, file)
    for i, ov in enumerate(raw.get("overrides") or []):
        if (
            not isinstance(ov, dict)
            or set(ov) - {"match", "set"}
            or not isinstance(ov.get("set"), dict)
            or not isinstance(ov.get("match") or {}, dict)
            or not all(isinstance(k, str) and k for k in [*ov["set"], *(ov.get("match") or {})])
        ):
            raise SpecError(f"{file}: overrides[{i}]: expected {{match: {{dotted: value}}, set: {{dotted: value}}}}")
        match = ov.get("match") or {}
        if all(cell.get(k) == v for k, v in match.items()):
            for key, value in ov["set"].items():
                if value is None and key.startswith("methods.") and key.count(".") == 1:
                    drop_method(out, key.split(".", 1)[1], f"{file}: overrides[{i}].set.{key}")
                else:
                    set_dotted(out, key, value, file)
    return out


def drop_method(raw: dict, name: str, where: str) -> None:
    """`set: {methods.NAME: null}` in a cell override: the method is not part of the matching cells (e.g. an
    oracle-only method in a grid over oracle and text data). Its `base:` children must be dropped too."""
    methods = raw.get("methods")
    if not isinstance(methods, dict) or name not in methods:
        known = list(methods) if isinstance(methods, dict) else []
        raise SpecError(f"{where}: unknown method {name!r}{did_you_mean(name, known)}")
    del methods[name]
    children = [m for m, v in methods.items() if isinstance(v, dict) and v.get("base") == name]
    if children:
        raise SpecError(f"{where}: methods {', '.join(children)} use {name!r} as base; drop them too")
