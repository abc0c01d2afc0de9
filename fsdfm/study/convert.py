"""Generic dict -> frozen dataclass conversion with key paths in the errors.

Knows: type hints of dataclasses (unions, tuples, finite floats, seeds), unknown keys with "did you mean".
Knows nothing of any particular spec section.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from typing import Any

from fsdfm.registry import did_you_mean
from fsdfm.study.yaml_io import SpecError, check_seed, short, short_message


def type_hints(cls: type) -> dict:
    """typing.get_type_hints of a dataclass, with the names its module imports only on first use: a module may
    define `_lazy_types() -> {name: type}` for annotations it does not import at module level (torch-side config
    classes), so that importing a schema stays cheap."""
    lazy = getattr(sys.modules.get(cls.__module__), "_lazy_types", None)
    return typing.get_type_hints(cls, localns=lazy() if lazy is not None else None)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, where: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, file)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(
            errors[-1]
            if len(errors) == 1
            else f"{file}: {where}: expected {' or '.join(_type_name(a) for a in args)}, got {short(value)}"
        )
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, file)
    if tp is Any:
        return value
    if tp in (dict,) or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{file}: {where}: expected a mapping, got {short(value)}")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise SpecError(f"{file}: {where}: expected a list, got {short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan pass every `> 0` check and poison training
                raise SpecError(f"{file}: {where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise SpecError(f"{file}: {where}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")


def build(cls: type, raw: Any, where: str, file: str):
    """Build the frozen dataclass `cls` from a mapping; unknown keys, wrong types and invalid values are
    SpecErrors naming `file` and the dotted key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: {where or '<top level>'}: expected a mapping, got {short(raw)}")
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("yaml", True)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise SpecError(
                f"{file}: unknown key {short(path)}{did_you_mean(str(key)[:80], names)}; allowed keys here: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, path, file)
        if str(key).endswith("seed") and kwargs[key] is not None:
            check_seed(kwargs[key], path, file)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SpecError(f"{file}: {where or '<top level>'}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        # a message that starts with a field ("t_start must ...", "optim.lr must ...", "DataConfig.dtype ...")
        # names that field's key
        m = re.match(r"(?:[A-Za-z_]+\.)?([A-Za-z_]+)\b", str(e))
        field_name = m.group(1) if m and m.group(1) in names else None
        key = f"{where}.{field_name}" if where and field_name else where or field_name or "<top level>"
        text = short_message(e)
        text = text[len(field_name) + 2 :] if field_name and text.startswith(f"{field_name}: ") else text
        raise SpecError(f"{file}: {key}: {text}") from None
