"""Method kinds and the planner: how each method family becomes stages of a study.

A `MethodKind` says which training stage builds the method's model (and, for students, which teacher kind
it distils from), which sampler the sample stage runs, which update rules it accepts and which settings class
its `distill:` / `checkpoint:` section builds. A kind file (fsdfm/methods/<kind>.py) declares all of that on
itself with `register_kind`, lm-eval's `@register_model` shape, so a new baseline is one new file.
`plan_study` walks the validated grid cells and emits one `StudyPlan`: stages are deduplicated by their
content ids, so a teacher shared by ten ablations is one stage.

`METHOD_KINDS` is filled by discovery (fsdfm.registry.discover): its first lookup imports every module of this
package and the `fsdfm.plugins` entry points, so a kind file registers itself by existing.

Boundary: knows the spec dataclasses (fsdfm.study.spec), the stage graph (fsdfm.study.graph), the update-rule
registry (fsdfm.samplers, whose import brings torch) and the fingerprint; no kind name is compared here. The checks
of a whole spec against the kinds are fsdfm.methods.load. One DFM-family assumption holds for every kind: the
pos_divergence runs are labelled with the cumulative_scalar rule the diagnostic samples with (a kind opts in with
`pos_divergence=True`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable

from fsdfm.fingerprint import with_fingerprint
from fsdfm.methods.common import SAMPLERS
from fsdfm.registry import Registry
from fsdfm.samplers import RULE_KINDS, rule_applies, rules_for
from fsdfm.study.graph import RunSpec, Stage, StudyPlan
from fsdfm.study.spec import FORWARD_PRECISIONS, Cell, MethodSpec, StudySpec

__all__ = [
    "EXACT_TEACHER",
    "DIAGNOSTICS",
    "METHOD_KINDS",
    "MethodKind",
    "Planner",
    "declared_rules",
    "path_source",
    "plan_study",
    "register_kind",
]

# kind name -> its MethodKind (settings class, planning, sampler, rules); filled by the kind files on import
METHOD_KINDS: Registry = Registry("method kind", discover=("fsdfm.methods",))
# diagnostic name -> fn(planner, model stage, method name, MethodSpec, add_run): the runs a diagnostic adds for one
# method beside its samples (pos_divergence here; exact_law, path_split in their own files), each a no-op unless the spec asks
DIAGNOSTICS: Registry = Registry("diagnostic", discover=("fsdfm.methods",))


def path_source(methods: dict, m: MethodSpec) -> str:
    """The source of the path a method samples: a student's is its teacher's (the distilled model inherits the
    teacher's path, `fsdfm.methods.fsdfm`), whatever its own `source` field says; `teacher: exact` names none."""
    seen = set()
    while getattr(m, "teacher", None) in methods and m.teacher not in seen:
        seen.add(m.teacher)
        m = methods[m.teacher]
    return m.source


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
    curve_metrics: (StudySpec, MethodSpec) -> the names the training stage's held-out curve records, so a stopping
        rule (`train.until.metric`) naming another is refused at spec load, not 250 steps into training; None: the
        kind does not say (no check).
    sanity: a model-free sanity baseline (e.g. a sampler that copies training text): its runs carry
        `sanity: True`, and the report shows them, labelled, and never marks them best.
    """

    name: str
    sampler: str
    rules: Sequence  # allowed rules, the first the default: a tuple, or `declared_rules` (every mixture rule)
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
    curve_metrics: Callable | None = None
    # the pos_divergence diagnostic applies (a DFM-family sampler and a DiT teacher to compare with)
    pos_divergence: bool = False
    sanity: bool = False


class MixtureRules(Sequence):
    """The update rules a mixture-path kind accepts: its default first, then every registered rule that applies to
    it (fsdfm.samplers.rules_for), read afresh on each use, so a rule registered later (a new rule module, a
    plugin) is accepted with no edit of the kind. Behaves as a tuple of names."""

    def __init__(self, kind: str, default: str):
        self.kind, self.default = kind, default

    def _names(self) -> tuple:
        return (self.default, *(r for r in rules_for(self.kind) if r != self.default))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self._names() == tuple(other)

    def __hash__(self) -> int:
        return hash((self.kind, self.default))


def declared_rules(kind: str, default: str) -> MixtureRules:
    """The rules of the mixture-path kind `kind`, `default` first (`MixtureRules`); the default must apply to it."""
    if default not in RULE_KINDS or not rule_applies(default, kind):
        raise ValueError(f"method kind {kind!r}: default rule {default!r} does not declare it applies to {kind!r}")
    return MixtureRules(kind, default)


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
        return self._reference_evaluator(ev.model, ev.train) if ev.kind == "reference" else None

    def _reference_evaluator(self, model: dict, train) -> Stage:
        """The train_ar stage of a reference evaluator: the study's preset with `model` over it, trained by `train`."""
        model = {"preset": self.spec.model.preset, **self.spec.model.overrides(), **model}
        return self.add(
            Stage("train_ar", {"role": "evaluator", "data": self.data, "model": model, "optim": train.to_dict()})
        )

    def evaluator_inputs(self) -> dict:
        """The evaluate stages' evaluator inputs: the reference evaluator's training stage ("evaluator") and the
        optional second one's ("evaluator_second", `evaluator.second`; absent otherwise, so ids stay put)."""
        ev, second = self.evaluator_stage(), self.spec.evaluator.second
        out = {"evaluator": ev.id} if ev is not None else {}
        if second is not None:
            out["evaluator_second"] = self._reference_evaluator(second.model, second.train).id
        return out


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
        ev_inputs = p.evaluator_inputs()
        eval_cfg = {
            "data": p.data,
            "metrics": dataclasses.asdict(spec.metrics),
            "n_samples": spec.sampling.n_samples,
            "seed": spec.sampling.seed,
            "evaluator": dataclasses.asdict(spec.evaluator),
        }
        for diagnostic in DIAGNOSTICS:  # their own stages: their settings are not in the evaluate stages' ids
            eval_cfg["metrics"].pop(diagnostic, None)
        eval_cfg["evaluator"].pop("train")
        eval_cfg["evaluator"].pop("second")  # an input stage of its own (evaluator_inputs), not a setting
        if spec.data_reference:
            ref = p.add(Stage("evaluate_data", eval_cfg, ev_inputs))
            data_run = {"method": "data", "kind": "data", "label": "data (held-out)", "rule": None, "steps": None}
            runs.add(data_run, ref, cell.params)
        for mname, m in spec.methods.items():
            model = p.model_stage(mname)
            _plan_samples(p, model, mname, m, eval_cfg, ev_inputs, lambda prm, fin: runs.add(prm, fin, cell.params))
            for diagnostic in DIAGNOSTICS:
                DIAGNOSTICS.get(diagnostic)(p, model, mname, m, lambda prm, fin: runs.add(prm, fin, cell.params))
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
        for steps in m.budgets:
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
                # only set knobs (fsdfm.sampling.knobs): a method without knobs keeps its stage ids
                **({"knobs": dict(sorted(m.knobs.items()))} if m.knobs else {}),
                # a sampler's declared version (`fn.version`), only once it is past "1": a changed draw reruns
                # the samples of the kinds that use it and no other stage
                **({"sampler_version": v} if (v := getattr(SAMPLERS.get(kind.sampler), "version", "1")) != "1" else {}),
            }
            sample = p.add(Stage("sample", cfg, {"model": model.id}))
            ev_stage = p.add(Stage("evaluate", eval_cfg, {"samples": sample.id, **ev_inputs}))
            knob_col = {"knobs": ",".join(f"{k}={v}" for k, v in sorted(m.knobs.items()))} if m.knobs else {}
            run = {"method": mname, "kind": m.kind, "label": m.label or mname, "rule": rule, "steps": steps}
            add_run(run | knob_col | ({"sanity": True} if kind.sanity else {}), ev_stage)


@DIAGNOSTICS.register("pos_divergence")
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
