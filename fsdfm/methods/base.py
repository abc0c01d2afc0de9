"""Method kinds and the planner: how each method family becomes stages of a study.

A `MethodKind` says which training stage builds the method's model (and, for students, which teacher kind
it distils from), which sampler the sample stage runs, which update rules it accepts and which settings class
its `distill:` / `checkpoint:` section builds. A kind file (fsdfm/methods/<kind>.py) declares all of that on
itself with `register_kind`, lm-eval's `@register_model` shape, so a new baseline is one new file.
`plan_study` walks the validated grid cells and emits one `StudyPlan`: stages are deduplicated by their
content ids, so a teacher shared by ten ablations is one stage.

Boundary: knows the spec dataclasses (fsdfm.study.spec), the stage graph (fsdfm.study.graph) and the registries
a spec's names are checked against (update rules, metrics, the DFM loss), which import torch; compares no kind
name (what differs between kinds is a `MethodKind` field). Two things are DFM-family assumptions made for every
kind: `source` and `loss` are validated whatever the kind, and the pos_divergence runs are labelled with the
cumulative_scalar rule the diagnostic samples with (a kind opts in with `pos_divergence=True`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from fsdfm.fingerprint import with_fingerprint
from fsdfm.registry import did_you_mean
from fsdfm.study.graph import RunSpec, Stage, StudyPlan
from fsdfm.study.spec import (
    FORWARD_PRECISIONS,
    METHOD_KINDS,
    PAIR_PATTERN,
    STUDY_CHECKS,
    Cell,
    MethodSpec,
    SpecError,
    StudySpec,
    build,
    short,
)
from fsdfm.metrics.registry import METRICS
from fsdfm.objectives import DFMConfig
from fsdfm.samplers import RULE_KINDS

__all__ = [
    "EXACT_TEACHER",
    "METHOD_KINDS",
    "MethodKind",
    "Planner",
    "declared_rules",
    "plan_study",
    "register_kind",
    "validate_methods",
    "validate_pairs",
]


def forward_precision_key(value: str) -> dict:
    """The sample stage's `forward_precision` entry: none for the default (float32), so that the stage ids of every
    study written before the setting existed are unchanged; {"forward_precision": value} otherwise."""
    return {} if value == FORWARD_PRECISIONS[0] else {"forward_precision": value}


@dataclass(frozen=True)
class MethodKind:
    """One method family.

    settings_key / settings_cls: the YAML section (`distill` or `checkpoint`) holding the kind's own settings
        and the frozen dataclass they build (built once, at spec load, into `MethodSpec.settings`); None: none.
    settings_required: the section must be given (released: which checkpoint).
    plans_from_checkpoint: the model is read, not trained (shown in messages; a `checkpoint:` section is an error
        for every other kind).
    validate: extra checks (spec, method name, MethodSpec, file) -> None, e.g. FS-DFM's teacher-exact shortcut.
    """

    name: str
    sampler: str
    rules: tuple  # allowed rules; the first is the default
    build_stage: Callable  # (planner, method name, MethodSpec) -> Stage
    teacher_kind: str | None = None
    settings_key: str | None = None
    settings_cls: type | None = None
    settings_required: bool = False
    exact_teacher: bool = False  # accepts `teacher: exact` (the oracle's exact posterior; oracle data only)
    oracle_only: bool = False  # valid only with data.kind: oracle
    teacher_optional: bool = False  # a teacher only for diagnostics (released: pos_divergence against it)
    # whether the sampler's time grid ends at 1 - eps (a generalized-KL model is trained on t <= 1 - eps)
    ends_before_one: Callable = lambda m: False
    validate: Callable | None = None
    # the pos_divergence diagnostic applies (a DFM-family sampler and a DiT teacher to compare with)
    pos_divergence: bool = False


def declared_rules(kind: str, default: str) -> tuple:
    """The update rules that declare they apply to `kind` (fsdfm.samplers.RULE_KINDS), `default` first: the rules
    a DFM-family kind accepts, so that adding a rule touches no kind file."""
    rules = [r for r, kinds in RULE_KINDS.items() if kind in kinds and r != default]
    if default not in RULE_KINDS or kind not in RULE_KINDS[default]:
        raise ValueError(f"method kind {kind!r}: default rule {default!r} does not declare it applies to {kind!r}")
    return (default, *rules)


def register_kind(kind: MethodKind) -> MethodKind:
    """Register `kind` under its name (a second kind of the same name is an error); returns it."""
    METHOD_KINDS.register(kind.name, kind)
    return kind


# `teacher: exact` names no method: the exact posterior p_{1|t} of the study's oracle source on the method's own
# path (its source and scheduler), computed by fsdfm.oracle_posterior. So the name is reserved.
EXACT_TEACHER = "exact"


class Planner:
    """Builds (and deduplicates) the stages of one grid cell."""

    def __init__(self, spec: StudySpec, stages: dict):
        self.spec, self.stages = spec, stages
        self.data = dataclasses.asdict(spec.data)

    def add(self, stage: Stage) -> Stage:
        """Deduplicate `stage` (with its fingerprint: code versions and data hashes, see fsdfm.fingerprint)."""
        stage = with_fingerprint(stage)
        return self.stages.setdefault(stage.id, stage)

    def model_cfg(self, method: MethodSpec) -> dict:
        return {"preset": self.spec.model.preset, **self.spec.model.overrides(), **method.model}

    def model_stage(self, name: str) -> Stage:
        method = self.spec.methods[name]
        return METHOD_KINDS.get(method.kind).build_stage(self, name, method)

    def optim(self, method: MethodSpec) -> dict:
        return method.train.to_dict()

    def evaluator_stage(self) -> Stage | None:
        ev = self.spec.evaluator
        if ev.kind != "reference":
            return None
        model = {"preset": self.spec.model.preset, **self.spec.model.overrides(), **ev.model}
        return self.add(
            Stage("train_ar", {"role": "evaluator", "data": self.data, "model": model, "optim": ev.train.to_dict()})
        )


def _section(kind: MethodKind, m: MethodSpec, key: str, where: str, file: str):
    """The kind's settings dataclass from the method's `key` section (`distill` or `checkpoint`), built once,
    here; None when the kind's settings live in the other section or it has none."""
    raw = getattr(m, key)
    if kind.settings_key != key:
        if raw and key == "checkpoint":
            raise SpecError(
                f"{file}: {where}.checkpoint: only a method of kind released reads a checkpoint; a {m.kind} "
                f"method is trained by the study"
            )
        if raw:
            raise SpecError(f"{file}: {where}.distill: a {m.kind} method takes no distill settings")
        return None
    if kind.settings_required and not raw:
        raise SpecError(
            f"{file}: {where}.{key}: a {m.kind} method needs {getattr(kind.settings_cls, 'SPEC_HINT', 'settings')}"
        )
    return build(kind.settings_cls, raw, f"{where}.{key}", file)


def validate_methods(spec: StudySpec, file: str) -> StudySpec:
    """Method kinds, teachers (existing, of the right kind, acyclic), rules, step budgets, kind settings; returns
    the spec with every method's typed `settings` filled in."""
    typed = {}
    for name, m in spec.methods.items():
        where = f"methods.{name}"
        if m.kind not in METHOD_KINDS:
            raise SpecError(
                f"{file}: {where}.kind: unknown method kind {short(m.kind)}{did_you_mean(m.kind, METHOD_KINDS.names())}; "
                f"allowed: {', '.join(METHOD_KINDS.names())}"
            )
        kind = METHOD_KINDS.get(m.kind)
        settings = _section(kind, m, "checkpoint", where, file)
        if name == EXACT_TEACHER:
            raise SpecError(
                f"{file}: methods.{name}: the method name {EXACT_TEACHER!r} is reserved for `teacher: exact` "
                "(the exact posterior); rename the method"
            )
        if kind.oracle_only and spec.data.kind != "oracle":
            raise SpecError(
                f"{file}: {where}.kind: an {m.kind} method needs data.kind: oracle (a source with an exact "
                f"posterior); data.kind is {spec.data.kind!r}"
            )
        if m.teacher == EXACT_TEACHER:
            if not kind.exact_teacher:
                raise SpecError(f"{file}: {where}.teacher: a {m.kind} method cannot use teacher {EXACT_TEACHER!r}")
            if spec.data.kind != "oracle":
                raise SpecError(
                    f"{file}: {where}.teacher: teacher {EXACT_TEACHER!r} (the exact posterior) needs "
                    f"data.kind: oracle; data.kind is {spec.data.kind!r}"
                )
            if kind.validate is not None:
                kind.validate(spec, name, m, file)
        elif kind.teacher_kind and (m.teacher is not None or not kind.teacher_optional):
            if m.teacher is None:
                raise SpecError(
                    f"{file}: {where}.teacher: a {m.kind} student needs a teacher (a method of kind {kind.teacher_kind})"
                )
            if m.teacher not in spec.methods:
                known = list(spec.methods) + ([EXACT_TEACHER] if kind.exact_teacher else [])
                raise SpecError(
                    f"{file}: {where}.teacher: unknown method {short(m.teacher)}{did_you_mean(m.teacher, known)}"
                )
            if spec.methods[m.teacher].kind != kind.teacher_kind:
                raise SpecError(
                    f"{file}: {where}.teacher: {short(m.teacher)} is a {spec.methods[m.teacher].kind} method; "
                    f"a {m.kind} student distils from a {kind.teacher_kind} method"
                )
        elif m.teacher is not None:
            raise SpecError(f"{file}: {where}.teacher: a {m.kind} method has no teacher")
        if m.source not in ("mask", "uniform"):
            raise SpecError(
                f"{file}: {where}.source: must be mask or uniform, got {short(m.source)}{did_you_mean(m.source, ['mask', 'uniform'])}"
            )
        try:
            DFMConfig(m.loss)
        except (ValueError, KeyError) as e:
            raise SpecError(f"{file}: {where}.loss: {e}") from None
        for rule in m.rules:
            if rule not in kind.rules:
                raise SpecError(
                    f"{file}: {where}.rules: {short(rule)} is not a rule of {m.kind}{did_you_mean(str(rule), list(kind.rules))}; "
                    f"allowed: {', '.join(kind.rules)}"
                )
        if not m.steps:
            raise SpecError(f"{file}: {where}.steps: list the step budgets to evaluate, e.g. [1, 8, 64]")
        for s in m.steps:
            if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 4096:
                raise SpecError(f"{file}: {where}.steps: step budgets are integers in 1..4096, got {short(s)}")
        settings = _section(kind, m, "distill", where, file) if settings is None else settings
        typed[name] = dataclasses.replace(m, settings=settings)
    for n in spec.metrics.names:
        if n not in METRICS:
            raise SpecError(f"{file}: metrics.names: unknown metric {short(n)}{did_you_mean(n, METRICS.names())}")
    spec = dataclasses.replace(spec, methods=typed)
    validate_pairs(spec, file)
    return spec


STUDY_CHECKS.append(validate_methods)


def validate_pairs(spec: StudySpec, file: str) -> None:
    """Each side of report.pairs names a method of the spec, one of its rules and one of its step budgets."""
    for i, pair in enumerate(spec.report.pairs):
        for side in pair:
            where = f"{file}: report.pairs[{i}]: {side!r}"
            g = PAIR_PATTERN.match(side).groupdict()
            m = spec.methods.get(g["method"])
            if m is None:
                raise SpecError(
                    f"{where}: unknown method {g['method']!r}{did_you_mean(g['method'], list(spec.methods))}"
                )
            rules = list(m.rules or METHOD_KINDS.get(m.kind).rules[:1])
            if g["rule"] is not None and g["rule"] not in rules:
                raise SpecError(
                    f"{where}: {g['method']} is not sampled with rule {g['rule']!r}"
                    f"{did_you_mean(g['rule'], rules)}; its rules: {', '.join(rules)}"
                )
            if int(g["steps"]) not in m.steps:
                raise SpecError(
                    f"{where}: {g['method']} is not sampled at {g['steps']} steps; "
                    f"its step budgets: {', '.join(map(str, m.steps))}"
                )


class _Runs:
    """The runs of a study as they are planned: deduplicated by (final stage, params), named at the end."""

    def __init__(self, grid_keys: list[str]):
        self.grid_keys = grid_keys
        self.runs: dict[str, dict] = {}

    def add(self, params: dict, final: Stage, cell: dict) -> None:
        key = final.id + "|" + "|".join(f"{k}={params[k]}" for k in sorted(params))
        if key in self.runs:  # the same run reached from another cell: grid values it does not depend on become None
            for k in self.grid_keys:
                if self.runs[key]["params"].get(k) != cell.get(k):
                    self.runs[key]["params"][k] = None
            return
        self.runs[key] = {"params": {**params, **{k: cell.get(k) for k in self.grid_keys}}, "stage_id": final.id}

    def specs(self) -> list[RunSpec]:
        out = []
        for i, r in enumerate(self.runs.values()):
            prm = r["params"]
            grid = ",".join(f"{k}={prm[k]}" for k in self.grid_keys)
            out.append(
                RunSpec(
                    run_id=f"{prm['method']}/{prm['rule']}/{prm['steps']}/{grid}#{i}",
                    params=prm,
                    stage_id=r["stage_id"],
                )
            )
        return out


def plan_study(name: str, cells: list[Cell]) -> StudyPlan:
    """Expand every grid cell into stages and runs (deduplicated by stage id and by run content)."""
    stages: dict[str, Stage] = {}
    runs = _Runs(sorted({k for c in cells for k in c.params}))
    for cell in cells:
        spec, p = cell.spec, Planner(cell.spec, stages)
        ev = p.evaluator_stage()
        ev_inputs = {"evaluator": ev.id} if ev is not None else {}
        eval_cfg = {
            "data": p.data,
            "metrics": dataclasses.asdict(spec.metrics),
            "n_samples": spec.sampling.n_samples,
            "seed": spec.sampling.seed,
            "evaluator": dataclasses.asdict(spec.evaluator),
        }
        eval_cfg["metrics"].pop("pos_divergence")
        eval_cfg["evaluator"].pop("train")
        if spec.data_reference:
            ref = p.add(Stage("evaluate_data", eval_cfg, ev_inputs))
            data_run = {"method": "data", "kind": "data", "label": "data (held-out)", "rule": None, "steps": None}
            runs.add(data_run, ref, cell.params)
        for mname, m in spec.methods.items():
            model = p.model_stage(mname)
            _plan_samples(p, model, mname, m, eval_cfg, ev_inputs, lambda prm, fin: runs.add(prm, fin, cell.params))
            _plan_divergence(p, model, mname, m, lambda prm, fin: runs.add(prm, fin, cell.params))
    rs = cells[0].spec.report if cells else None
    report = {"mauve_min_n": rs.mauve_min_n, "pairs": [list(p) for p in rs.pairs]} if rs is not None else {}
    # tracking settings go to plan.json, not into any stage config: a tracked study has the same stage ids
    ts = cells[0].spec.tracking if cells else None
    return StudyPlan(
        name=name, stages=stages, runs=runs.specs(), report=report, tracking=ts.to_plan() if ts is not None else {}
    )


def _plan_samples(
    p: Planner, model: Stage, mname: str, m: MethodSpec, eval_cfg: dict, ev_inputs: dict, add_run: Callable
) -> None:
    """A sample stage of `model` and its evaluate stage (a run) per (rule, step budget) of method `mname`."""
    spec, kind = p.spec, METHOD_KINDS.get(m.kind)
    t_end = 1.0 - spec.sampling.eps if kind.ends_before_one(m) else 1.0
    for rule in m.rules or kind.rules[:1]:
        for steps in m.steps:
            cfg = {
                "data": p.data,
                "sampler": kind.sampler,
                "rule": rule,
                "steps": steps,
                "t_end": t_end,
                "n_samples": spec.sampling.n_samples,
                "batch_size": spec.sampling.batch_size,
                "seed": spec.sampling.seed,
                "precision": spec.sampling.precision,
                # only when not the default, so that a float32 study keeps its stage ids
                **forward_precision_key(spec.sampling.forward_precision),
            }
            sample = p.add(Stage("sample", cfg, {"model": model.id}))
            ev_stage = p.add(Stage("evaluate", eval_cfg, {"samples": sample.id, **ev_inputs}))
            add_run(
                {"method": mname, "kind": m.kind, "label": m.label or mname, "rule": rule, "steps": steps}, ev_stage
            )


def _plan_divergence(p: Planner, model: Stage, mname: str, m: MethodSpec, add_run: Callable) -> None:
    """The pos_divergence diagnostic of a student against its (trained) teacher, per student step budget."""
    spec, kind = p.spec, METHOD_KINDS.get(m.kind)
    pd = spec.metrics.pos_divergence
    if pd is None or not kind.pos_divergence or m.teacher is None or m.teacher == EXACT_TEACHER:
        return
    for k in pd.student_steps:
        cfg = {
            "data": p.data,
            **dataclasses.asdict(pd),
            "student_steps": k,
            "seed": spec.sampling.seed,
            "precision": spec.sampling.precision,
        }
        inputs = {"teacher": p.model_stage(m.teacher).id, "student": model.id}
        div = p.add(Stage("pos_divergence", cfg, inputs))
        label = f"{m.label or mname} vs {m.teacher}"
        add_run(
            {"method": mname, "kind": "pos_divergence", "label": label, "rule": "cumulative_scalar", "steps": k}, div
        )
