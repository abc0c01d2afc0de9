"""One registry type for every string -> object mapping in the suite, and the one function that finds extensions.

Specs name schedulers, sources, update rules, metrics, stage kinds, ... by string; a `Registry` turns the
string into the object and, on a typo, raises a `KeyError` subclass that lists the close matches
("did you mean") and every allowed name, as lm-evaluation-harness does.

Extensions are found, not listed: a registry declared with `discover=("fsdfm.methods",)` calls `discover` on
its first lookup, which imports every module of those packages (a `pkgutil` scan: a new file registers itself
by being there) and loads the entry points of the group `fsdfm.plugins` (an out-of-tree plugin: a distribution
whose metadata names `module` or `module:object` in that group; loading imports the module, whose decorators
register). `discover` is the only place in fsdfm that imports a module by name (tests/test_architecture.py
checks that, and counts each declared package as an import of the declaring module, so that discovery cannot
hide an upward edge between floors).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import sys
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name. `str(err)` is a complete, human-readable message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


PLUGIN_GROUP = "fsdfm.plugins"
_scanned: set[str] = set()  # packages whose modules have all been imported (a scan is done once per process)
_plugins_loaded: set[str] = set()  # entry points (name=value) already loaded


class PluginError(ImportError):
    """An entry point of the group `fsdfm.plugins` that does not load; the message names it and its value."""


def discover(*packages: str, submodules: bool = True) -> None:
    """Import every module of `packages` (each a package or a plain module, by dotted name; with
    `submodules=False` only the named modules themselves) and load every entry point of the group `PLUGIN_GROUP`,
    each at most once per process.

    Why a scan and not a list: a new kind, rule, metric or executor is one file that registers itself on import,
    so no list elsewhere has to name it. Entry points are re-read on every call (cheap: the installed
    distributions' metadata), so a plugin installed after an earlier lookup is still found by the next registry
    that discovers.

    Raises:
        PluginError: an entry point whose module does not import (its error is chained).
    """
    for package in packages:
        if package in _scanned:
            continue
        mod = importlib.import_module(package)
        if not submodules:
            continue
        _scanned.add(package)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), prefix=package + "."):
            if info.name not in sys.modules:
                importlib.import_module(info.name)
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _plugins_loaded:
            continue
        _plugins_loaded.add(key)
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of a plugin is reported as that plugin's
            raise PluginError(f"plugin {ep.name!r} ({PLUGIN_GROUP}: {ep.value}) does not load: {e}") from e


class Registry(Generic[T]):
    """A named mapping from strings to objects, filled with the `register` decorator.

    >>> rules = Registry("update rule")
    >>> @rules.register("euler")
    ... def euler(): ...
    >>> rules.get("eular")
    Traceback (most recent call last):
    UnknownNameError: unknown update rule 'eular' (did you mean 'euler'?); allowed: euler
    """

    def __init__(self, kind: str, discover: tuple[str, ...] = ()):
        """kind: what a name names (in messages); discover: the packages whose modules register entries here,
        imported (with the `fsdfm.plugins` entry points) on the first lookup (`discover`)."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._packages = tuple(discover)
        self._discovered = not self._packages

    def discover(self) -> None:
        """Find every entry (see the module docstring); a lookup does this once, before answering."""
        if self._discovered:
            return
        self._discovered = True  # first: a module imported by the scan may look a name up while registering
        try:
            discover(*self._packages)
        except BaseException:
            self._discovered = False
            raise

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; usable as `@registry.register("name")`."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        if name not in self._items:
            self.discover()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.discover()
        return len(self._items)
