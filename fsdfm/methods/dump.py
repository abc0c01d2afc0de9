"""A validated spec back to a plain mapping with every default resolved: what `fsdfm run SPEC --print-config` prints.

`resolved_config(spec)` walks the frozen dataclasses of a `StudySpec` (data, model, sampling, evaluator, metrics,
report, each method's training settings) and writes each method kind's own settings (`distill:` of FS-DFM/FMLM,
`checkpoint:` of a released model) from the typed dataclass the kind built at load, so a setting left out of the
YAML shows with the value the run will use (a method's `train.seed` not written is the study's `seed`, cell by
cell, and stays unwritten). `base:` is already merged; the grid and per-cell overrides are kept as
written (they apply on top, cell by cell). The mapping loads back as a spec that plans the same stages.

Except for FLM and FMLM (`WRITTEN_SETTINGS_KINDS`): their stage ids hash the `distill:` mapping as written (see
`fsdfm.methods.flm`), so writing a default there would plan new stages. Their mapping stays as written and
`dump_yaml` shows the settings in effect as a comment beside it.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import PurePath
from typing import Any

from fsdfm.study.grid import resolve_bases
from fsdfm.methods.base import METHOD_KINDS
from fsdfm.study.spec import StudySpec

# StudySpec fields the YAML does not hold (derived at load), left out of the mapping
_NOT_YAML = {"overrides"}
# method kinds whose stage ids hash their settings mapping as written (fsdfm.methods.flm, fsdfm.methods.fmlm)
WRITTEN_SETTINGS_KINDS = ("flm", "fmlm")


def to_plain(x: Any) -> Any:
    """Dataclasses -> dicts (fields marked `metadata={"yaml": False}` left out), tuples -> lists, paths -> str."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {
            f.name: to_plain(getattr(x, f.name))
            for f in dataclasses.fields(x)
            if f.metadata.get("yaml", True) is not False
        }
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, PurePath):
        return str(x)
    if isinstance(x, enum.Enum):
        return x.value
    return x


def resolved_config(spec: StudySpec, raw: dict | None = None) -> dict:
    """The spec as a mapping with every default filled in (module docstring).

    Args:
        spec: the base spec `fsdfm.study.load.load` / `load_spec` returns (methods' typed settings built).
        raw: the mapping it was built from (after overrides); its `grid` and `overrides` sections are copied as
            written, and keys of it the dataclasses do not model are kept.
    Returns: a dict in the order of the spec's fields.
    """
    out = to_plain(spec)
    raw = dict(raw or {})
    for key in _NOT_YAML:
        out.pop(key, None)
    if "overrides" in raw:
        out["overrides"] = raw["overrides"]
    if "grid" in raw:
        out["grid"] = raw["grid"]
    if spec.tracking is None:
        out.pop("tracking", None)  # off: the section is absent, not null
    written = resolve_bases(raw["methods"], "<spec>") if isinstance(raw.get("methods"), dict) else {}
    for name, method in spec.methods.items():
        kind = METHOD_KINDS.get(method.kind)
        d = out["methods"][name]
        if "seed" not in ((written.get(name) or {}).get("train") or {}):
            # not a default but the study's `seed` (each grid cell's own): left to follow it
            d["train"].pop("seed", None)
        for key in ("distill", "checkpoint"):
            if not d.get(key) and key != kind.settings_key:
                d.pop(key, None)  # a section this kind does not take
        d["rules"] = list(method.rules or kind.rules[:1])  # an empty list plans the kind's default rule
        if kind.settings_key and method.settings is not None and method.kind not in WRITTEN_SETTINGS_KINDS:
            d[kind.settings_key] = to_plain(method.settings)
        for key in ("teacher", "label"):
            if d.get(key) is None:
                d.pop(key, None)
    return out


def dump_yaml(spec: StudySpec, raw: dict | None = None) -> str:
    """`resolved_config` as YAML, with the settings in effect of each `WRITTEN_SETTINGS_KINDS` method as a comment
    on its settings line ("distill: {}  # in effect: {tau_min: 0.0, tau_max: 1.0} ...")."""
    import yaml

    text = yaml.safe_dump(resolved_config(spec, raw), sort_keys=False, width=120, allow_unicode=True).rstrip()
    lines = text.splitlines()
    start = lines.index("methods:") if "methods:" in lines else len(lines)
    for name, method in spec.methods.items():
        kind = METHOD_KINDS.get(method.kind)
        if method.kind not in WRITTEN_SETTINGS_KINDS or method.settings is None:
            continue
        effective = yaml.safe_dump(to_plain(method.settings), default_flow_style=True, width=10_000).strip()
        head = lines.index(f"  {name}:", start)
        for i in range(head + 1, len(lines)):
            if lines[i].startswith(f"    {kind.settings_key}:"):
                lines[i] += f"  # in effect: {effective} (left as written: the stage id hashes this mapping)"
                break
            if not lines[i].startswith("    "):
                break
    return "\n".join(lines)
