"""Study specs: YAML -> frozen dataclasses, validated before anything runs, expanded into a stage graph.

A spec names the data, the model preset, the methods (teachers, students, baselines) with their training
settings, the sampler settings, the metrics and a grid: a cartesian product over any dotted field
(`seed`, `sampling.seed`, `methods.fsdfm.distill.shortcut`, ...), plus per-cell overrides. Every error is one
`SpecError` naming the file and the key path, with close matches for unknown names.

A method may `base` on another method of the same spec (deep-merged), so an ablation is one line.

Everything that can be checked before a run starts is checked by `load_spec`, which writes nothing: the YAML
itself (safe-loaded, no duplicate keys, aliases bounded against "billion laughs" expansion), names (one path
component), seeds (ints in [0, 2**63)), finite floats, model keys, and the data and evaluator files
(`check_data`, fsdfm.data.preflight). Values quoted in messages are truncated (`short`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fsdfm.data.base import DataConfig
from fsdfm.registry import did_you_mean
from fsdfm.tracking import TrackingSpec
from fsdfm.train import OptimConfig


class SpecError(ValueError):
    """A malformed study spec; the message names the file and the key path."""


MAX_SPEC_BYTES = 1 << 20       # a spec is a page of YAML; a larger file is refused before parsing
MAX_EXPANDED_NODES = 100_000   # YAML aliases expanded: an "alias bomb" of ~1 KB expands to billions of nodes
MAX_DEPTH = 64                 # nesting of mappings and lists
SEED_RANGE = (0, 2**63)        # seeds: ints accepted by torch.manual_seed and numpy.random.default_rng
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
        raise SpecError(f"{file}: {key}: a name is 1-128 characters of letters, digits and . _ + - starting with a "
                        f"letter or digit (no '/', '..', spaces or control characters), got {short(value)}")
    return value


def check_seed(value: Any, key: str, file: str) -> None:
    lo, hi = SEED_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise SpecError(f"{file}: {key}: a seed is an integer in [0, 2**63), got {short(value)}")


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

    def __post_init__(self):
        for name in ("n_states", "n_rollouts", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.t_start < 1.0:
            raise ValueError(f"t_start must lie in (0, 1), got {self.t_start!r}")
        for k in self.student_steps:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 4096:
                raise ValueError(f"student_steps are integers in 1..4096, got {short(k)}")


@dataclass(frozen=True)
class MetricsSpec:
    names: tuple = ("gen_ppl", "entropy_nats", "entropy_bits", "mauve", "distinct_1", "distinct_2", "distinct_3",
                    "distinct_4", "self_bleu", "rep_n")
    mauve_featurizer: str = "minilm"
    mauve_buckets: str | int = "auto"
    mauve_seeds: int = 5  # k-means seeds MAUVE is averaged over (>= 5; mean and std recorded)
    self_bleu_subsample: int = 64
    pos_divergence: PosDivergenceSpec | None = None

    def __post_init__(self):
        from fsdfm.metrics.mauve import FEATURIZERS, resolve_num_buckets
        from fsdfm.registry import UnknownNameError
        try:
            FEATURIZERS.get(self.mauve_featurizer)
        except UnknownNameError as e:
            raise ValueError(f"mauve_featurizer: {e}") from None
        try:
            resolve_num_buckets(self.mauve_buckets, 2)
        except ValueError as e:
            raise ValueError(f"mauve_buckets: {str(e).removeprefix('mauve: ')}") from None
        if self.self_bleu_subsample < 1:
            raise ValueError(f"self_bleu_subsample must be >= 1, got {self.self_bleu_subsample!r}")
        if isinstance(self.mauve_seeds, bool) or not isinstance(self.mauve_seeds, int) or self.mauve_seeds < 5:
            raise ValueError(f"mauve_seeds must be an int >= 5 (one k-means draw is noise), got {self.mauve_seeds!r}")


PAIR_PATTERN = re.compile(r"^(?P<method>[^/@]+)(?:/(?P<rule>[^/@]+))?@(?P<steps>\d+)$")


@dataclass(frozen=True)
class ReportSpec:
    """Report settings (in plan.json, not in any stage id).

    mauve_min_n: MAUVE from fewer samples per side is footnoted "unreliable, n = ..." and never marked best.
    pairs: headline comparisons, each [A, B] with A, B = "METHOD@STEPS" or "METHOD/RULE@STEPS" (METHOD: a
           key of `methods`), compared on per-sample values with a confidence interval of the difference.
    """

    mauve_min_n: int = 256
    pairs: tuple = ()

    def __post_init__(self):
        if isinstance(self.mauve_min_n, bool) or not isinstance(self.mauve_min_n, int) or self.mauve_min_n < 2:
            raise ValueError(f"mauve_min_n must be an int >= 2, got {self.mauve_min_n!r}")
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"pairs[{i}]: expected [A, B] with A, B like 'fsdfm@8' or 'dfm/euler@8', got {pair!r}")
            for x in pair:
                if not PAIR_PATTERN.match(x):
                    raise ValueError(f"pairs[{i}]: {x!r} is not METHOD@STEPS or METHOD/RULE@STEPS (e.g. 'fsdfm@8')")
        object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))


@dataclass(frozen=True)
class LimitSpec:
    """What `fsdfm run SPEC --limit N` (a smoke run) does besides N samples per run (in no stage id).

    train_steps: cap every method's and the reference evaluator's train.steps (and warmup_steps, ckpt_every) at
        this; None = training unchanged. set: further dotted overrides of the smoke run ({dotted key: value}).
    """

    train_steps: int | None = None
    set: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps!r}")


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
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec | None = None  # fsdfm.tracking: in plan.json, never in a stage id (it changes no result)
    limit: LimitSpec = LimitSpec()


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
                        f"{file}: {where}: expected {' or '.join(_type_name(a) for a in args)}, got {short(value)}")
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
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise SpecError(f"{file}: unknown key {short(path)}{did_you_mean(str(key)[:80], names)}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, path, file)
        if str(key).endswith("seed") and kwargs[key] is not None:
            check_seed(kwargs[key], path, file)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
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
        text = text[len(field_name) + 2:] if field_name and text.startswith(f"{field_name}: ") else text
        raise SpecError(f"{file}: {key}: {text}") from None


# ----------------------------------------------------------------------------------------------------------
# Loading, method inheritance, grid cells

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
                    raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: duplicate key {short(key)} "
                                            f"(first given on line {first}; YAML would silently keep the last)")
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
        raise SpecError(f"{file}: {where}expands to {n:.3g} YAML nodes through its aliases (limit {limit}); "
                        f"a spec is a small document (an alias bomb?)")
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
        if (not isinstance(ov, dict) or set(ov) - {"match", "set"} or not isinstance(ov.get("set"), dict)
                or not isinstance(ov.get("match") or {}, dict)
                or not all(isinstance(k, str) and k for k in [*ov["set"], *(ov.get("match") or {})])):
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
    check_name(spec.name, "name", file)
    for name, m in methods.items():
        check_name(name, f"methods.{name}", file)
        if m.label is not None and (not m.label.isprintable() or len(m.label) > 200):
            raise SpecError(f"{file}: methods.{name}.label: a label is one printable line of at most 200 "
                            f"characters, got {short(m.label)}")
    validate_methods(spec, file)
    base = {"preset": spec.model.preset, **spec.model.overrides()}
    for name, m in methods.items():
        check_model({**base, **m.model}, f"methods.{name}.model", file, spec.data.seq_len)
    if spec.evaluator.kind == "reference":
        check_model({**base, **spec.evaluator.model}, "evaluator.model", file, spec.data.seq_len)
    for key in ("train", "valid"):
        value = getattr(spec.data, key)
        if spec.data.kind in ("text", "tokens") and value is not None and not Path(value).exists():
            shown = value if value.isprintable() and len(value) <= 200 else short(value)
            raise SpecError(f"{file}: data.{key}: file not found: {shown}")
    return spec


# Model sizes the pipeline sets from the data and the source; a spec cannot override them.
MODEL_DERIVED = ("vocab_size", "seq_len", "input_vocab_size")


def check_model(model: dict, where: str, file: str, seq_len: int) -> None:
    """A model mapping ({preset, hidden, n_heads, ...}) as the pipeline will build it: known keys (with close
    matches), the types of ModelConfig, and a valid config (e.g. hidden splits into heads of even size)."""
    from fsdfm.model import ModelConfig, model_config
    from fsdfm.registry import UnknownNameError

    hints = typing.get_type_hints(ModelConfig)
    allowed = ["preset"] + [f.name for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_DERIVED]
    sizes = {}
    for key, value in model.items():
        if key not in allowed:
            raise SpecError(f"{file}: unknown key '{where}.{key}'{did_you_mean(str(key), allowed)}; "
                            f"allowed keys here: {', '.join(allowed)}")
        sizes[key] = _convert(str if key == "preset" else hints[key], value, f"{where}.{key}", file)
    preset = sizes.pop("preset")
    try:
        model_config(preset, 2, seq_len, **sizes)
    except (ValueError, TypeError, UnknownNameError) as e:
        raise SpecError(f"{file}: {where}: {short_message(e)}") from None


def check_data(spec: StudySpec, file: str, cache_dir: str | Path | None) -> None:
    """The data and the evaluator as far as they can be checked cheaply and without writing: files, sizes, token
    ids, vocabularies, corpus length (fsdfm.data.preflight), an hf evaluator present offline, and the MiniLM
    files of the MAUVE featurizer."""
    from fsdfm.data.preflight import PreflightError, preflight

    try:
        preflight(spec.data, Path(cache_dir) if cache_dir is not None else None)
    except PreflightError as e:
        raise SpecError(f"{file}: data.{e.key}: {short_message(e)}") from None
    if "mauve" in spec.metrics.names and spec.metrics.mauve_featurizer == "minilm":
        from fsdfm.metrics import mauve
        try:
            mauve.minilm_model_dir()
        except RuntimeError as e:
            raise SpecError(f"{file}: metrics.mauve_featurizer: {short_message(e)}") from None
    if spec.evaluator.kind == "hf":
        from fsdfm.metrics.evaluator import EvaluatorError, check_evaluator_available
        try:
            check_evaluator_available(spec.evaluator.name)
        except EvaluatorError as e:
            raise SpecError(f"{file}: evaluator.name: {short_message(e)}") from None


@dataclass(frozen=True)
class Cell:
    """One grid cell: its grid values and its validated spec."""

    params: dict
    spec: StudySpec


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | None, file: str) -> dict:
    """A copy of the raw spec mapping with each dotted override `key: value` written into it (before validation,
    so an overridden spec is checked exactly like a YAML file): `fsdfm.overrides.apply_overrides`, which checks
    each key against the spec's fields ("did you mean") and treats `grid.KEY` as one grid axis. None: a copy."""
    if not overrides:
        return copy.deepcopy(raw)
    from fsdfm.overrides import apply_overrides as _apply

    out = _apply(raw, overrides, file)
    expanded_size(out, file)
    return out


def _naming_overrides(e: SpecError, overrides: Mapping[str, Any] | None) -> SpecError:
    """The error of a spec validated after overrides, naming the override(s) whose keys it mentions."""
    text = str(e)

    def mentioned(key: str) -> bool:  # the key, or a prefix of it an "unknown key" message stops at, as a whole path
        parts = key.split(".")
        return any(re.search(r"(?<![\w.])" + re.escape(".".join(parts[:n])) + r"(?![\w])", text)
                   for n in range(len(parts), min(2, len(parts)) - 1, -1))

    named = [k for k in (overrides or {}) if isinstance(k, str) and mentioned(k)]
    if not named:
        return e
    return SpecError(text + " (set by override " + ", ".join(f"{k}={short(overrides[k], 60)}" for k in named) + ")")


def load_spec(path: str | Path, cache_dir: str | Path | None = None, check_files: bool = True,
              overrides: Mapping[str, Any] | None = None) -> tuple[StudySpec, list[Cell]]:
    """Read and validate a spec file; returns the base spec and every grid cell's spec.

    Args:
        cache_dir: the results root's data cache (tokenizers, packed blocks), read, never written, so that the
            data checks can reuse a tokenizer a previous run trained.
        check_files: also check the data files and the evaluator (`check_data`), once per distinct data config.
        overrides: dotted key -> value, applied before validation (`apply_overrides`).
    Nothing is written: a spec that passes cannot fail later on anything checked here.
    """
    return load_spec_dict(read_yaml(path), str(path), cache_dir, check_files, overrides, spec_dir=Path(str(path)).parent)


def load_spec_dict(raw: Mapping[str, Any], file: str = "<spec dict>", cache_dir: str | Path | None = None,
                   check_files: bool = True, overrides: Mapping[str, Any] | None = None,
                   spec_dir: str | Path | None = None) -> tuple[StudySpec, list[Cell]]:
    """`load_spec` for a spec already in memory (a dict, as `yaml.safe_load` of the file would give it); `file`
    names it in errors; relative paths resolve against `spec_dir` (None: as given, i.e. against the working
    directory). The same checks as a YAML file, after the overrides."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{file}: a spec must be a mapping at the top level, got {type(raw).__name__}")
    expanded_size(dict(raw), file)
    raw = apply_overrides(dict(raw), overrides, file)
    try:
        return expand(raw, file, cache_dir=cache_dir, check_files=check_files, spec_dir=spec_dir)
    except SpecError as e:
        raise _naming_overrides(e, overrides) from None


def expand(raw: dict, file: str, cache_dir: str | Path | None = None, check_files: bool = True,
           spec_dir: str | Path | None = None) -> tuple[StudySpec, list[Cell]]:
    """Validate and expand a spec mapping (as read from `file`, perhaps with overrides applied): the base spec and
    every grid cell's spec. Relative paths in it resolve against `spec_dir` (fsdfm.spec_paths); None = as given."""
    from fsdfm.spec_paths import resolve_paths

    cells = grid_cells(raw, file)
    specs = []
    for cell in cells:
        one = cell_raw(raw, cell, file)
        if spec_dir is not None:
            one = resolve_paths(one, Path(spec_dir), file)
        specs.append(Cell(cell, build_study(one, file)))
    if check_files:
        seen = set()
        for c in specs:
            key = repr((dataclasses.asdict(c.spec.data), c.spec.evaluator.kind, c.spec.evaluator.name))
            if key not in seen:
                seen.add(key)
                check_data(c.spec, file, cache_dir)
    return specs[0].spec, specs
