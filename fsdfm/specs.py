"""Study specs: YAML -> frozen dataclasses, validated before anything runs, expanded into a stage graph.

A spec names the data, the model preset, the methods (teachers, students, baselines) with their training
settings, the sampler settings, the metrics and a grid: a cartesian product over any dotted field
(`seed`, `sampling.seed`, `methods.fsdfm.distill.shortcut`, ...), plus per-cell overrides. Every error is one
`SpecError` naming the file and the key path, with close matches for unknown names.

A method may `base` on another method of the same spec (deep-merged), so an ablation is one line.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsdfm.data.base import DataConfig
from fsdfm.registry import did_you_mean
from fsdfm.train import OptimConfig


class SpecError(ValueError):
    """A malformed study spec; the message names the file and the key path."""


@dataclass(frozen=True)
class ModelSpec:
    """Model preset (tiny, small, 1.3b) and optional size overrides."""

    preset: str = "tiny"
    hidden: int | None = None
    cond_dim: int | None = None
    n_blocks: int | None = None
    n_heads: int | None = None

    def __post_init__(self):
        from fsdfm.model import PRESETS
        PRESETS.get(self.preset)

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "polynomial"
    n: float = 1.0

    def __post_init__(self):
        from fsdfm.schedulers import SCHEDULERS
        SCHEDULERS.get(self.name)

    def kwargs(self) -> dict:
        return {"n": self.n} if self.name == "polynomial" else {}


@dataclass(frozen=True)
class MethodSpec:
    """One method of a study. `kind` picks the method family (dfm, fsdfm, ar, flm, fmlm); `teacher` names
    the method a student distils from; `rules` x `steps` are the sampler settings it is evaluated at."""

    kind: str
    teacher: str | None = None
    source: str = "mask"
    scheduler: SchedulerSpec = SchedulerSpec()
    loss: str = "ce"
    model: dict = field(default_factory=dict)
    train: OptimConfig = OptimConfig()
    distill: dict = field(default_factory=dict)
    rules: tuple = ()
    steps: tuple = ()
    label: str | None = None
    checkpoint: dict = field(default_factory=dict)  # kind "released": {path, which} of a checkpoint to evaluate


@dataclass(frozen=True)
class SamplingSpec:
    n_samples: int = 64
    batch_size: int = 64
    seed: int = 0
    precision: str = "float64"
    eps: float = 1e-3

    def __post_init__(self):
        if self.precision not in ("float64", "float32"):
            raise ValueError(f"precision must be float64 or float32, got {self.precision!r}")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError("n_samples and batch_size must be >= 1")


@dataclass(frozen=True)
class EvaluatorSpec:
    """reference: an AR model trained by the suite on the train split; hf: any HF causal LM by name or path;
    none: no evaluator (text-free metrics only, e.g. oracle studies)."""

    kind: str = "reference"
    name: str | None = None
    model: dict = field(default_factory=dict)
    train: OptimConfig = OptimConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=50, seed=1234, ema_decay=None)

    def __post_init__(self):
        if self.kind not in ("reference", "hf", "none"):
            raise ValueError(f"kind must be reference, hf or none, got {self.kind!r}{did_you_mean(self.kind, ['reference', 'hf', 'none'])}")
        if self.kind == "hf" and not self.name:
            raise ValueError("an hf evaluator needs a name (a model id or a local path)")


@dataclass(frozen=True)
class PosDivergenceSpec:
    """Per-position divergence of few-step students from the many-step teacher, from states on teacher paths."""

    n_states: int = 4
    n_rollouts: int = 8
    t_start: float = 0.5
    teacher_steps: int = 256
    student_steps: tuple = (1, 8)


@dataclass(frozen=True)
class MetricsSpec:
    names: tuple = ("gen_ppl", "entropy_nats", "entropy_bits", "mauve", "distinct_1", "distinct_2", "distinct_3",
                    "distinct_4", "self_bleu", "rep_n")
    mauve_featurizer: str = "minilm"
    mauve_buckets: str | int = "auto"
    self_bleu_subsample: int = 64
    pos_divergence: PosDivergenceSpec | None = None


@dataclass(frozen=True)
class Override:
    match: dict
    set: dict


@dataclass(frozen=True)
class StudySpec:
    name: str
    data: DataConfig
    methods: dict
    description: str = ""
    model: ModelSpec = ModelSpec()
    seed: int = 0
    sampling: SamplingSpec = SamplingSpec()
    evaluator: EvaluatorSpec = EvaluatorSpec()
    metrics: MetricsSpec = MetricsSpec()
    grid: dict = field(default_factory=dict)
    overrides: tuple = ()
    data_reference: bool = True
    published: tuple = ()
    cluster: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with key paths in the errors

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
        raise SpecError(errors[-1] if len(errors) == 1 else
                        f"{file}: {where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, file)
    if tp is Any:
        return value
    if tp in (dict,) or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{file}: {where}: expected a mapping, got {value!r}")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise SpecError(f"{file}: {where}: expected a list, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise SpecError(f"{file}: {where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls: type, raw: Any, where: str, file: str):
    """Build the frozen dataclass `cls` from a mapping; unknown keys, wrong types and invalid values are
    SpecErrors naming `file` and the dotted key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: {where or '<top level>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise SpecError(f"{file}: unknown key '{path}'{did_you_mean(str(key), names)}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, path, file)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{file}: {where or '<top level>'}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise SpecError(f"{file}: {where or '<top level>'}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Loading, method inheritance, grid cells

def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping at the top level, got {type(raw).__name__}")
    return raw


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
            raise SpecError(f"{file}: methods.{name}: expected a mapping, got {raw!r}")
        base = raw.get("base")
        if base is None:
            out = dict(raw)
        else:
            if base not in methods:
                raise SpecError(f"{file}: methods.{name}.base: unknown method {base!r}{did_you_mean(base, list(methods))}")
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
            raise SpecError(f"{file}: grid key '{dotted}': '{'.'.join(keys[:i + 1])}' is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def grid_cells(raw: dict, file: str) -> list[dict]:
    """The cartesian product of `grid` (dotted key -> list of values), with `overrides` applied."""
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SpecError(f"{file}: grid: expected a mapping of dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{file}: grid.{key}: expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] or [{}]


def cell_raw(raw: dict, cell: dict, file: str) -> dict:
    """The spec of one grid cell: the grid values and the matching overrides written into a copy."""
    out = copy.deepcopy({k: v for k, v in raw.items() if k not in ("grid", "overrides")})
    for key, value in cell.items():
        set_dotted(out, key, value, file)
    for i, ov in enumerate(raw.get("overrides") or []):
        if not isinstance(ov, dict) or set(ov) - {"match", "set"} or not isinstance(ov.get("set"), dict):
            raise SpecError(f"{file}: overrides[{i}]: expected {{match: {{dotted: value}}, set: {{dotted: value}}}}")
        match = ov.get("match") or {}
        if all(cell.get(k) == v for k, v in match.items()):
            for key, value in ov["set"].items():
                set_dotted(out, key, value, file)
    return out


def build_study(raw: dict, file: str) -> StudySpec:
    """Validate one (cell) spec: dataclasses, method inheritance, method kinds and teachers, files."""
    from fsdfm.methods import validate_methods

    raw = dict(raw)
    if "methods" in raw:
        raw["methods"] = resolve_bases(raw["methods"], file)
    methods_raw = raw.pop("methods", None)
    raw["methods"] = {}
    if isinstance(methods_raw, dict):  # the study-level seed is every method's training seed unless it sets its own
        for m in methods_raw.values():
            if isinstance(m, dict) and isinstance(m.get("train", {}), dict):
                m["train"] = {"seed": raw.get("seed", 0), **m.get("train", {})}
    spec = build(StudySpec, raw, "", file)
    if not methods_raw:
        raise SpecError(f"{file}: methods: expected a non-empty mapping of method name -> settings")
    methods = {name: build(MethodSpec, m, f"methods.{name}", file) for name, m in methods_raw.items()}
    spec = dataclasses.replace(spec, methods=methods)
    validate_methods(spec, file)
    for key in ("train", "valid"):
        value = getattr(spec.data, key)
        if spec.data.kind in ("text", "tokens") and value is not None and not Path(value).exists():
            raise SpecError(f"{file}: data.{key}: file not found: {value}")
    return spec


@dataclass(frozen=True)
class Cell:
    """One grid cell: its grid values and its validated spec."""

    params: dict
    spec: StudySpec


def load_spec(path: str | Path) -> tuple[StudySpec, list[Cell]]:
    """Read and validate a spec file; returns the base spec and every grid cell's spec."""
    file = str(path)
    raw = read_yaml(path)
    cells = grid_cells(raw, file)
    specs = [Cell(cell, build_study(cell_raw(raw, cell, file), file)) for cell in cells]
    return specs[0].spec, specs
