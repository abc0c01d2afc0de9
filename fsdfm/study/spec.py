"""Study specs: YAML -> frozen dataclasses, validated before anything runs, expanded into grid cells.

A spec names the data, the model preset, the methods (teachers, students, baselines) with their training
settings, the sampler settings, the metrics and a grid: a cartesian product over any dotted field
(`seed`, `sampling.seed`, `methods.fsdfm.distill.shortcut`, ...), plus per-cell overrides. Every error is one
`SpecError` naming the file and the key path, with close matches for unknown names.

A method may `base` on another method of the same spec (deep-merged), so an ablation is one line.

Everything that can be checked before a run starts is checked by `load_spec`, which writes nothing: the YAML
itself (safe-loaded, no duplicate keys, aliases bounded against "billion laughs" expansion; fsdfm.study.yaml_io),
names (one path component), seeds (ints in [0, 2**63)), finite floats, model keys, and the data and evaluator
files (`check_data`, fsdfm.data.preflight). Values quoted in messages are truncated (`short`).

Boundary: this module knows the schema every study shares and nothing of any method kind: it imports no method
code and holds no kinds' registry. A kind's own settings (`distill:`, `checkpoint:`) and the checks that need
the kinds (teachers, rules, budgets) live in fsdfm.methods, whose loader (`fsdfm.methods.load`) passes them to
`build_study` as `checks`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdfm.registry import UnknownNameError, did_you_mean
from fsdfm.study.convert import _convert, build
from fsdfm.study.diagnostics import ExactLawSpec, PathSplitSpec, PosDivergenceSpec  # noqa: F401 (the MetricsSpec annotations)
from fsdfm.study.grid import resolve_bases
from fsdfm.study.bounds import check_bounds
from fsdfm.study.yaml_io import NAME_PATTERN, SpecError, check_name, read_yaml, short, short_message
from fsdfm.tracking import TrackingSpec

if typing.TYPE_CHECKING:
    from fsdfm.data.base import DataConfig
    from fsdfm.train import OptimConfig

__all__ = ["NAME_PATTERN", "SpecError", "check_name", "read_yaml", "short", "short_message", "build"]


def _lazy_types() -> dict:
    """The torch-side config classes the schema's annotations name (DataConfig, OptimConfig), imported on first
    use (fsdfm.study.convert.type_hints) so that importing this module imports no torch."""
    from fsdfm.data.base import DataConfig  # heavy: torch
    from fsdfm.train import OptimConfig  # heavy: torch

    return {"DataConfig": DataConfig, "OptimConfig": OptimConfig}


def _optim(**settings):
    """The factory of a default OptimConfig, built when a spec is (the class lives in fsdfm.train, beside the
    training loop, which imports torch)."""

    def make():
        from fsdfm.train import OptimConfig  # heavy: torch

        return OptimConfig(**settings)

    return make


@dataclass(frozen=True)
class ModelSpec:
    """Model preset (tiny, small, 1.3b) and optional size overrides."""

    preset: str = "tiny"
    hidden: int | None = None
    cond_dim: int | None = None
    n_blocks: int | None = None
    n_heads: int | None = None

    def __post_init__(self):
        from fsdfm.model import PRESETS  # heavy: torch

        PRESETS.get(self.preset)

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "polynomial"
    n: float = 1.0

    def __post_init__(self):
        from fsdfm.schedulers import SCHEDULERS  # heavy: torch

        SCHEDULERS.get(self.name)

    def kwargs(self) -> dict:
        return {"n": self.n} if self.name == "polynomial" else {}


@dataclass(frozen=True)
class MethodSpec:
    """One method of a study. `kind` picks the method family (dfm, fsdfm, ar, flm, fmlm, ...); `teacher` names
    the method a student distils from; `rules` x `budgets` are the sampler settings it is evaluated at (the
    sampling budgets: steps of the sampler, not optimiser steps, which are `train.steps`; the old YAML key
    `steps` still works, with a deprecation warning: `DEPRECATED_METHOD_KEYS`).

    `source`, `scheduler` and `loss` are the mixture path's settings: only the kinds that sample that path read
    them (fsdfm.methods.load.check_path_settings refuses them elsewhere).

    `distill` and `checkpoint` are the YAML mappings of the kind's own settings as written; `settings` is the
    kind's frozen dataclass built from them once, at load (`MethodKind.settings_cls`; None for a kind without).
    """

    kind: str
    teacher: str | None = None
    source: str = "mask"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    loss: str = "ce"
    model: dict = field(default_factory=dict)
    train: OptimConfig = field(default_factory=_optim())
    distill: dict = field(default_factory=dict)
    rules: tuple = ()
    budgets: tuple = ()
    label: str | None = None
    checkpoint: dict = field(default_factory=dict)  # kind "released": {path, which} of a checkpoint to evaluate
    knobs: dict = field(default_factory=dict)  # sampler knobs (fsdfm.sampling.knobs): temperature, top_p, ...
    settings: Any = field(default=None, metadata={"yaml": False})


FORWARD_PRECISIONS = ("float32", "bfloat16")  # sampling.forward_precision; the first is the default


@dataclass(frozen=True)
class SamplingSpec:
    """precision: dtype of the categorical draws (float64, or float32 as the known low-precision artefact).
    forward_precision: dtype of the network's forward while sampling: float32, or bfloat16 (bf16 autocast plus TF32
    matmuls on a GPU: ~3x faster there, to be used where `fsdfm.metrics.forward_precision.check_forward_precision`
    finds its effect on the token distribution below the sampling noise). The draws stay in `precision` either way.
    A non-default value enters the sample stages' configs (and ids); the default leaves them as they were."""

    n_samples: int = 64
    batch_size: int = 64
    seed: int = 0
    precision: str = "float64"
    eps: float = 1e-3
    forward_precision: str = "float32"

    def __post_init__(self):
        if self.precision not in ("float64", "float32"):
            raise ValueError(f"precision must be float64 or float32, got {self.precision!r}")
        if self.forward_precision not in FORWARD_PRECISIONS:
            raise ValueError(f"forward_precision must be float32 or bfloat16, got {self.forward_precision!r}")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError("n_samples and batch_size must be >= 1")


@dataclass(frozen=True)
class SecondEvaluatorSpec:
    """`evaluator.second`: a second reference AR model, trained by the suite on the train split like the first
    (its own size and training; the study's preset plus `model`): every evaluate stage also scores the samples'
    gen_ppl under it (`gen_ppl_second`), and the report checks that the two evaluators rank runs alike
    (`table_evaluator_agreement`). Offline, a larger model trained longer is the second opinion a text study has."""

    model: dict = field(default_factory=dict)
    train: OptimConfig = field(
        default_factory=_optim(steps=1500, batch_size=32, lr=1e-3, warmup_steps=50, seed=4321, ema_decay=None)
    )


@dataclass(frozen=True)
class EvaluatorSpec:
    """reference: an AR model trained by the suite on the train split; hf: any HF causal LM by name or path;
    none: no evaluator (text-free metrics only, e.g. oracle studies). second: an optional second reference
    evaluator (`SecondEvaluatorSpec`)."""

    kind: str = "reference"
    name: str | None = None
    model: dict = field(default_factory=dict)
    train: OptimConfig = field(
        default_factory=_optim(steps=600, batch_size=32, lr=1e-3, warmup_steps=50, seed=1234, ema_decay=None)
    )
    second: SecondEvaluatorSpec | None = None

    def __post_init__(self):
        if self.kind not in ("reference", "hf", "none"):
            raise ValueError(
                f"kind must be reference, hf or none, got {self.kind!r}{did_you_mean(self.kind, ['reference', 'hf', 'none'])}"
            )
        if self.kind == "hf" and not self.name:
            raise ValueError("an hf evaluator needs a name (a model id or a local path)")
        if self.second is not None and self.kind == "none":
            raise ValueError("second: a second evaluator is checked against the first; kind none has no first")


@dataclass(frozen=True)
class MetricsSpec:
    names: tuple = (
        "gen_ppl",
        "entropy_nats",
        "entropy_bits",
        "mauve",
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "distinct_4",
        "self_bleu",
        "rep_n",
    )
    mauve_featurizer: str = "minilm"
    mauve_buckets: str | int = "auto"
    mauve_seeds: int = 5  # k-means seeds MAUVE is averaged over (>= 5; mean and std recorded)
    self_bleu_subsample: int = 64
    pos_divergence: PosDivergenceSpec | None = None
    exact_law: ExactLawSpec | None = None
    path_split: PathSplitSpec | None = None

    def __post_init__(self):
        from fsdfm.metrics.mauve import FEATURIZERS, resolve_num_buckets  # heavy: torch

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
           key of `methods`; the rule may be left out only where the method has one), compared on per-sample
           values with a confidence interval of the difference.
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
    model: ModelSpec = field(default_factory=ModelSpec)
    seed: int = 0
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    evaluator: EvaluatorSpec = field(default_factory=EvaluatorSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    grid: dict = field(default_factory=dict)
    overrides: tuple = ()
    data_reference: bool = True
    published: tuple = ()
    cluster: dict = field(default_factory=dict)
    report: ReportSpec = field(default_factory=ReportSpec)
    tracking: TrackingSpec | None = None  # fsdfm.tracking: in plan.json, never in a stage id (it changes no result)
    limit: LimitSpec = field(default_factory=LimitSpec)


# ----------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with key paths in the errors

# ----------------------------------------------------------------------------------------------------------
# One cell: validation of the dataclasses, of the methods (through the kinds' checks) and of the files


# old YAML key of a method -> its name now (a deprecation warning names the method; both at once is an error)
DEPRECATED_METHOD_KEYS = {"steps": "budgets"}
_WARNED: set[str] = set()


def renamed_keys(method: Any, where: str, file: str) -> Any:
    """A method's raw mapping with its deprecated keys renamed (`DEPRECATED_METHOD_KEYS`), warning once per key."""
    if not isinstance(method, dict) or not set(method) & set(DEPRECATED_METHOD_KEYS):
        return method
    method = dict(method)
    for old, new in DEPRECATED_METHOD_KEYS.items():
        if old not in method:
            continue
        if new in method:
            raise SpecError(f"{file}: {where}: both {new} and {old} (the old name of {new}); keep {new}")
        note = f"fsdfm: warning: {file}: {where}.{old} is deprecated: name it {new}"
        if note not in _WARNED:  # one line per spec and key, however often the spec is expanded
            _WARNED.add(note)
            print(note, file=sys.stderr)
        method[new] = method.pop(old)
    return method


def build_study(raw: dict, file: str, checks: tuple = ()) -> StudySpec:
    """Validate one (cell) spec: dataclasses, method inheritance, model sizes, files, then each of `checks`
    ((spec, file) -> spec: fsdfm.methods.load's method kinds and teachers, which fill in the kinds' settings)."""
    raw = dict(raw)
    if isinstance(raw.get("methods"), dict):  # before the bases merge, so that `base:` sees one name per key
        raw["methods"] = {n: renamed_keys(m, f"methods.{n}", file) for n, m in raw["methods"].items()}
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
            raise SpecError(
                f"{file}: methods.{name}.label: a label is one printable line of at most 200 "
                f"characters, got {short(m.label)}"
            )
    for check in checks:
        spec = check(spec, file)
    base = {"preset": spec.model.preset, **spec.model.overrides()}
    for name, m in methods.items():
        check_model({**base, **m.model}, f"methods.{name}.model", file, spec.data.seq_len)
    if spec.evaluator.kind == "reference":
        check_model({**base, **spec.evaluator.model}, "evaluator.model", file, spec.data.seq_len)
    if spec.evaluator.second is not None:
        check_model({**base, **spec.evaluator.second.model}, "evaluator.second.model", file, spec.data.seq_len)
    check_bounds(spec, file)  # sizes that decide memory and time: before anything is planned or written
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
    from fsdfm.model import ModelConfig, model_config  # heavy: torch

    hints = typing.get_type_hints(ModelConfig)
    allowed = ["preset"] + [f.name for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_DERIVED]
    sizes = {}
    for key, value in model.items():
        if key not in allowed:
            raise SpecError(
                f"{file}: unknown key '{where}.{key}'{did_you_mean(str(key), allowed)}; "
                f"allowed keys here: {', '.join(allowed)}"
            )
        sizes[key] = _convert(str if key == "preset" else hints[key], value, f"{where}.{key}", file)
    preset = sizes.pop("preset")
    try:
        model_config(preset, 2, seq_len, **sizes)
    except (ValueError, TypeError, UnknownNameError) as e:
        raise SpecError(f"{file}: {where}: {short_message(e)}") from None


@dataclass(frozen=True)
class Cell:
    """One grid cell: its grid values and its validated spec."""

    params: dict
    spec: StudySpec
