"""Overrides and sweeps of a study spec, from the command line (`fsdfm run SPEC a.b=1 seed=0,1,2 --limit 8`) or
from Python (`apply_overrides(raw, {"sampling.seed": 1}, file)`).

A spec with overrides expands into the same validated, content-addressed plan as a YAML file holding the same
values, so an override changes exactly the stage ids that depend on it:

    KEY=VALUE         VALUE is YAML (1, 0.5, true, null, rk4, [1, 2], {K: 8}); KEY a dotted spec key
                      (methods.fsdfm.distill.K, sampling.seed, data.max_train_blocks, ...)
    KEY=A,B,C         a sweep: the same as `grid: {KEY: [A, B, C]}` in the spec
    grid.KEY=[A, B]   a grid axis given directly (KEY is the grid's dotted key, as in the YAML)
    --limit N         a smoke run: N samples per run, training shrunk as the spec's `limit:` section declares

A plain override of a key the grid sweeps replaces that axis by its one value. Overrides are written into the
spec before the grid expands; the spec's own per-cell `overrides:` still apply on top of them.

A study run with overrides lives in its own directory, `<name>+<what was overridden>` (or `<name>+<hash>` when
that is not a short directory name), so `fsdfm report SPEC seed=3` finds it and `fsdfm report SPEC` still shows
the study as the file declares it; an explicit `name=...` override names the study exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from fsdfm.registry import did_you_mean
from fsdfm.study.convert import type_hints
from fsdfm.study.spec import (
    DEPRECATED_METHOD_KEYS,
    EvaluatorSpec,
    SecondEvaluatorSpec,
    LimitSpec,
    MethodSpec,
    NAME_PATTERN,
    SpecError,
    StudySpec,
    build,
    resolve_bases,
    short,
)
from fsdfm.study.yaml_io import _SpecLoader


def _yaml_value(text: str, shown: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader) if text.strip() else None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"override {shown}: the value is not valid YAML ({first})") from None


def _split_commas(text: str) -> list[str]:
    """Split at the commas outside brackets and quotes ("1,2" -> ["1", "2"]; "[1,2]" stays whole)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Command-line words KEY=VALUE -> {dotted key: value}; a sweep KEY=A,B becomes {"grid.KEY": [A, B]}.

    Args:
        args: the words after the spec, e.g. ["seed=0,1,2", "methods.fsdfm.distill.K=8"].
    Returns:
        the mapping `apply_overrides` takes, in command-line order. A word without '=', an empty key part or a
        key given twice is a SpecError naming the word.
    """
    out: dict[str, Any] = {}
    for word in args:
        key, sep, text = word.partition("=")
        shown = repr(word) if len(word) <= 120 else short(word)
        key = key.strip()
        if not sep or not key or any(not k or k != k.strip() for k in key.split(".")):
            raise SpecError(
                f"override {shown}: expected KEY=VALUE with a dotted spec key, e.g. sampling.seed=1 "
                "(a sweep: seed=0,1,2)"
            )
        parts = _split_commas(text)
        if len(parts) > 1:  # a sweep
            values = [_yaml_value(p, shown) for p in parts]
            key = key if key.startswith("grid.") else f"grid.{key}"
            value: Any = values
        else:
            value = _yaml_value(text, shown)
        if key in out:
            raise SpecError(f"override {shown}: {key} is given twice on the command line")
        out[key] = value
    return out


def format_override(key: str, value: Any) -> str:
    """KEY=VALUE as it would be typed (values in YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _unwrap(tp: Any) -> Any:
    """X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def check_key(raw: dict, key: str, label: str) -> None:
    """A dotted key names a field of the spec: an unknown one is a SpecError with close matches (`label` names
    the override). Keys under a free-form mapping (cluster, a method's model, ...) are checked when the spec
    is built, like the YAML's."""
    parts = key.split(".")
    cls: Any = StudySpec
    i = 0
    while i < len(parts) and cls is not None:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        part = parts[i]
        if cls is MethodSpec and part in DEPRECATED_METHOD_KEYS:  # the old name (renamed, with a warning, at build)
            part = DEPRECATED_METHOD_KEYS[part]
        if part not in names:
            where = ".".join(parts[: i + 1])
            raise SpecError(
                f"{label}: unknown key {where}{did_you_mean(part, names)}; allowed keys here: {', '.join(names)}"
            )
        if cls is StudySpec and part == "methods":
            methods = raw.get("methods") if isinstance(raw.get("methods"), dict) else {}
            if i + 1 < len(parts):
                name = parts[i + 1]
                if name not in methods:
                    raise SpecError(
                        f"{label}: methods.{name}: the spec has no method {name!r}"
                        f"{did_you_mean(name, list(methods))}; its methods: {', '.join(methods)}"
                    )
                cls, i = MethodSpec, i + 2
                continue
            return
        tp = _unwrap(type_hints(cls)[part])
        cls = tp if dataclasses.is_dataclass(tp) else None
        i += 1


def _set(node: dict, key: str, value: Any, label: str) -> None:
    keys = key.split(".")
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{label}: {'.'.join(keys[: i + 1])} is {short(child)}, not a mapping")
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def apply_overrides(raw: dict, overrides: Mapping[str, Any], file: str) -> dict:
    """A copy of the spec mapping `raw` with `overrides` ({dotted key: value}) written in.

    "grid.KEY" sets the grid axis KEY (a non-empty list); "grid" replaces the whole grid; any other key is a
    spec field (checked by `check_key`) and replaces a grid axis of the same key by its one value.

    Args:
        raw: the spec as read (`fsdfm.study.spec.read_yaml`); not modified.
        overrides: dotted key -> value (Python values, e.g. from `parse_overrides`).
        file: the spec file, named in the errors with the override.
    Returns:
        the new mapping, to be validated and expanded like a YAML file (`expand`).
    """
    if not isinstance(overrides, Mapping):
        raise SpecError(f"{file}: overrides: expected a mapping of dotted keys to values, got {short(overrides)}")
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        label = f"{file}: override {format_override(str(key), value)}" if isinstance(key, str) else file
        if not isinstance(key, str) or not key or any(not k for k in key.split(".")):
            raise SpecError(f"{label}: a key is a dotted spec key such as 'sampling.seed', got {short(key)}")
        if key == "grid":
            if not isinstance(value, dict):
                raise SpecError(f"{label}: grid is a mapping of dotted keys to lists of values")
            out["grid"] = copy.deepcopy(value)
            continue
        grid = out.get("grid")
        if grid is None:
            grid = {}
        if not isinstance(grid, dict):
            raise SpecError(f"{label}: the spec's grid is not a mapping")
        if key.startswith("grid."):
            axis = key[len("grid.") :]
            check_key(out, axis, label)
            if not isinstance(value, list) or not value:
                raise SpecError(f"{label}: a grid axis is a non-empty list of values, e.g. {axis}=[0,1] or {axis}=0,1")
            out["grid"] = {**grid, axis: copy.deepcopy(value)}
            continue
        check_key(out, key, label)
        if key in grid:
            out["grid"] = {**grid, key: [copy.deepcopy(value)]}
        else:
            _set(out, key, value, label)
    return out


# ---------------------------------------------------------------------------------------------- --limit
def limit_overrides(raw: dict, n: int, file: str) -> dict[str, Any]:
    """The overrides of a smoke run with `n` samples per run (`--limit N`).

    sampling.n_samples = n (and batch_size at most n); with the spec's `limit: {train_steps: S}` every method's
    and the reference evaluator's train.steps (and warmup_steps, ckpt_every) become at most S; `limit.set` adds
    any other dotted overrides (e.g. metrics.pos_divergence.teacher_steps). Without a `limit` section only the
    sample counts shrink.
    """
    from fsdfm.train import OptimConfig  # heavy: torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"--limit: expected a positive number of samples per run, got {short(n)}")
    lim = build(LimitSpec, raw.get("limit"), "limit", file)
    sampling = raw.get("sampling") if isinstance(raw.get("sampling"), dict) else {}
    batch = sampling.get("batch_size", 64)
    out: dict[str, Any] = {"sampling.n_samples": n}
    if isinstance(batch, int) and batch > n:
        out["sampling.batch_size"] = n
    if lim.train_steps is not None:
        cap = lim.train_steps
        defaults = OptimConfig()

        def capped(prefix: str, train: Any, base: OptimConfig) -> None:
            train = train if isinstance(train, dict) else {}
            for field_name in ("steps", "warmup_steps", "ckpt_every"):
                value = train.get(field_name, getattr(base, field_name))
                if isinstance(value, int) and value > cap:
                    out[f"{prefix}.train.{field_name}"] = cap

        methods = resolve_bases(raw.get("methods"), file)
        for name, m in methods.items():
            capped(f"methods.{name}", m.get("train"), defaults)
        ev = raw.get("evaluator") if isinstance(raw.get("evaluator"), dict) else {}
        if ev.get("kind", "reference") == "reference":
            capped("evaluator", ev.get("train"), EvaluatorSpec().train)
        if isinstance(ev.get("second"), dict):
            capped("evaluator.second", ev["second"].get("train"), SecondEvaluatorSpec().train)
    out.update(lim.set)
    return out


# ------------------------------------------------------------------------------------------- study names
def study_name(base: str, overrides: Mapping[str, Any], limit: int | None) -> str:
    """The study (results directory) name of spec `base` run with `overrides` and `--limit`.

    base itself without either; `base+limit-8+seed-3` (pieces sorted by key) when that is a valid name of at
    most 128 characters, else `base+<10 hex of the overrides' sha256>`. An explicit "name" override wins.
    """
    if "name" in overrides:
        return overrides["name"]
    items = sorted((k, v) for k, v in overrides.items())
    if not items and limit is None:
        return base

    def fmt(v: Any) -> str:
        if isinstance(v, list):
            return "_".join(fmt(x) for x in v)
        return v if isinstance(v, str) else json.dumps(v)

    pieces = ([f"limit-{limit}"] if limit is not None else []) + [f"{k}-{fmt(v)}" for k, v in items]
    name = base + "+" + "+".join(pieces)
    if len(name) <= 128 and NAME_PATTERN.fullmatch(name):
        return name
    digest = hashlib.sha256(json.dumps([limit, items], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{base}+{digest}"
