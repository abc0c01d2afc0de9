"""The safe YAML reader of study specs and the error vocabulary every spec check speaks.

Knows: YAML text, size limits (bytes, alias expansion, depth), duplicate keys, names and seeds, how to quote a
value in a message (`short`). Knows nothing of what a spec means: fields and kinds are fsdfm.study.spec's.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A malformed study spec; the message names the file and the key path."""


MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; a larger file is refused before parsing
MAX_EXPANDED_NODES = 100_000  # YAML aliases expanded: an "alias bomb" of ~1 KB expands to billions of nodes
MAX_DEPTH = 64  # nesting of mappings and lists
SEED_RANGE = (0, 2**63)  # seeds: ints accepted by torch.manual_seed and numpy.random.default_rng
# Study and method names become directory names, run ids and table rows: one path component, printable.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 4, 3


def short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters: error messages never echo a huge (or alias-bomb) value."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_message(err: BaseException, limit: int = 400) -> str:
    """str(err) cut to `limit` characters (messages of nested checks may quote values)."""
    text = str(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(value: Any, key: str, file: str) -> str:
    """A study or method name: one path component of letters, digits and ._+- (no '/', '..', NUL, newline)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise SpecError(
            f"{file}: {key}: a name is 1-128 characters of letters, digits and . _ + - starting with a "
            f"letter or digit (no '/', '..', spaces or control characters), got {short(value)}"
        )
    return value


def check_seed(value: Any, key: str, file: str) -> None:
    lo, hi = SEED_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise SpecError(f"{file}: {key}: a seed is an integer in [0, 2**63), got {short(value)}")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice."""


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently).
    Keys brought in by a `<<:` merge may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> line of its first occurrence
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        f"line {key_node.start_mark.line + 1}: duplicate key {short(key)} "
                        f"(first given on line {first}; YAML would silently keep the last)"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def expanded_size(obj: Any, file: str, limit: int = MAX_EXPANDED_NODES) -> int:
    """Number of nodes of `obj` with every shared (aliased) mapping or list counted each time it is used.

    PyYAML builds an alias as a shared reference, so a ~1 KB document of nested aliases is small in memory but
    expands to 10^9 nodes when copied, printed or written to plan.json; it is refused here, in time linear in the
    number of distinct nodes. Recursive aliases and nesting deeper than MAX_DEPTH are refused too.
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any, depth: int) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if depth > MAX_DEPTH:
            raise SpecError(f"{file}: nested deeper than {MAX_DEPTH} levels")
        k = id(x)
        if k in memo:
            return memo[k]
        if k in active:
            raise SpecError(f"{file}: a YAML alias refers to a mapping or list that contains it (recursive alias)")
        active.add(k)
        items = [*x.keys(), *x.values()] if isinstance(x, dict) else x
        n = 1 + sum(size(c, depth + 1) for c in items)
        active.discard(k)
        memo[k] = n
        return n

    n = size(obj, 0)
    if n > limit:
        where = ""
        if isinstance(obj, dict) and obj:
            key = max(obj, key=lambda k: size(obj[k], 1))
            where = f"{short(key)}: "
        raise SpecError(
            f"{file}: {where}expands to {n:.3g} YAML nodes through its aliases (limit {limit}); "
            f"a spec is a small document (an alias bomb?)"
        )
    return n


def read_yaml(path: str | Path) -> dict:
    """Safe-load a spec file: at most MAX_SPEC_BYTES, no duplicate keys, aliases expanding to at most
    MAX_EXPANDED_NODES nodes, a mapping at the top level. Every failure is a SpecError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {size} bytes; a spec file is at most {MAX_SPEC_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except DuplicateKeyError as e:
        raise SpecError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {short_message(e)}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping at the top level, got {type(raw).__name__}")
    expanded_size(raw, str(path))
    return raw
