"""Method kinds: how each method family (dfm, fsdfm, ar, flm, fmlm, released) becomes stages of a study.

A `MethodKind` says which training stage builds the method's model (and, for students, which teacher kind
it distils from), which sampler the sample stage runs and which update rules it accepts. `plan_study`
walks the validated grid cells and emits one `StudyPlan`: stages are deduplicated by their content ids,
so a teacher shared by ten ablations is one stage. Kind "released" trains nothing: its model stage checks and
points to an existing apple/ml-fs-dfm checkpoint (fsdfm.checkpoints.load_released), which is then sampled and
evaluated like any DFM-family model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from fsdfm.fingerprint import with_fingerprint
from fsdfm.flm import FLMConfig
from fsdfm.fmlm import FMLMConfig
from fsdfm.objectives import FROZEN_TEACHER_SHORTCUTS, DFMConfig, FSDFMConfig
from fsdfm.registry import Registry, did_you_mean
from fsdfm.specs import Cell, MethodSpec, SpecError, StudySpec, build, short
from fsdfm.stages import RunSpec, Stage, StudyPlan


@dataclass(frozen=True)
class StudentSpec(FSDFMConfig):
    """FS-DFM distillation settings: every FSDFMConfig knob plus the step-size embedding."""

    h_embedding: str = "log2"

    def __post_init__(self):
        super().__post_init__()
        if self.h_embedding not in ("raw", "log2"):
            raise ValueError(f"h_embedding must be raw or log2, got {self.h_embedding!r}")

    def objective(self) -> FSDFMConfig:
        return FSDFMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FSDFMConfig)})


RELEASED_ENTRIES = ("student_ema", "student", "teacher")


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released checkpoint to evaluate without training.

    path: the .pth file (relative to the working directory); which: the entry to load, "student_ema" (the FS-DFM
        EMA student, what the official evaluation uses), "student" or "teacher" (the DFM weights: the DFM 1.3B
        file's "model", or a distillation file's frozen "teacher_model").
    """

    path: str
    which: str = "student_ema"

    def __post_init__(self):
        if self.which not in RELEASED_ENTRIES:
            raise ValueError(f"which must be one of {', '.join(RELEASED_ENTRIES)}, got {self.which!r}"
                             f"{did_you_mean(str(self.which), list(RELEASED_ENTRIES))}")


@dataclass(frozen=True)
class NoDistill:
    """Methods without distillation settings accept none."""


@dataclass(frozen=True)
class MethodKind:
    name: str
    sampler: str
    rules: tuple            # allowed rules; the first is the default
    build_stage: Callable   # (planner, method name, MethodSpec) -> Stage
    teacher_kind: str | None = None
    distill_cls: type = NoDistill
    exact_teacher: bool = False  # accepts `teacher: exact` (the oracle's exact posterior; oracle data only)
    oracle_only: bool = False    # valid only with data.kind: oracle
    teacher_optional: bool = False  # a teacher only for diagnostics (released: pos_divergence against it)
    checkpoint_cls: type | None = None  # the `checkpoint:` settings of a kind that reads an existing model
    # whether the sampler's time grid ends at 1 - eps (a generalized-KL model is trained on t <= 1 - eps)
    ends_before_one: Callable = lambda m: False


# `teacher: exact` names no method: the exact posterior p_{1|t} of the study's oracle source on the method's own
# path (its source and scheduler), computed by fsdfm.oracle_posterior. So the name is reserved.
EXACT_TEACHER = "exact"


METHOD_KINDS: Registry = Registry("method kind")


class Planner:
    """Builds (and deduplicates) the stages of one grid cell."""

    def __init__(self, spec: StudySpec, stages: dict):
        import fsdfm.pipeline  # noqa: F401  (registers the stage kinds, whose versions enter the ids)

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
        return self.add(Stage("train_ar", {"role": "evaluator", "data": self.data, "model": model,
                                           "optim": ev.train.to_dict()}))


def _exact_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    """The exact posterior of the oracle source on the method's path: no training, one small record."""
    return p.add(Stage("exact_posterior", {"data": p.data, "source": m.source,
                                           "scheduler": dataclasses.asdict(m.scheduler)}))


def _dfm_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    # `teacher: exact`: the "exact targets" baseline, trained on KL(exact posterior || model) instead of CE on x_1
    inputs = {"teacher": _exact_stage(p, name, m).id} if m.teacher == EXACT_TEACHER else {}
    return p.add(Stage("train_dfm", {"data": p.data, "model": p.model_cfg(m), "source": m.source,
                                     "scheduler": dataclasses.asdict(m.scheduler),
                                     "objective": dataclasses.asdict(DFMConfig(m.loss, p.spec.sampling.eps)),
                                     "optim": p.optim(m)}, inputs))


def _fsdfm_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    student = StudentSpec(**m.distill)
    config = {"data": p.data, "distill": dataclasses.asdict(student), "optim": p.optim(m)}
    if m.teacher == EXACT_TEACHER:
        # no teacher weights: the student is a fresh DiT of its own model settings on its own path, and the exact
        # posterior is its frozen shortcut evaluator (the role of the frozen DFM teacher)
        teacher = _exact_stage(p, name, m)
        config["model"] = p.model_cfg(m)
    else:
        teacher = p.model_stage(m.teacher)
    return p.add(Stage("distil_fsdfm", config, {"teacher": teacher.id}))


def _ar_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    return p.add(Stage("train_ar", {"role": "baseline", "data": p.data, "model": p.model_cfg(m), "optim": p.optim(m)}))


def _flm_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    return p.add(Stage("train_flm", {"data": p.data, "model": p.model_cfg(m), "flm": dict(m.distill), "optim": p.optim(m)}))


def _fmlm_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    teacher = p.model_stage(m.teacher)
    return p.add(Stage("distil_fmlm", {"data": p.data, "fmlm": dict(m.distill), "optim": p.optim(m)},
                       {"teacher": teacher.id}))


def _released_stage(p: Planner, name: str, m: MethodSpec) -> Stage:
    ckpt = ReleasedCheckpoint(**m.checkpoint)
    return p.add(Stage("load_released", {"data": p.data, "checkpoint": dataclasses.asdict(ckpt), "source": m.source,
                                         "scheduler": dataclasses.asdict(m.scheduler)}))


METHOD_KINDS.register("dfm", MethodKind("dfm", "dfm", ("euler", "cumulative_scalar", "mixture_euler", "mdlm"), _dfm_stage,
                                        exact_teacher=True, ends_before_one=lambda m: m.loss == "gkl"))
METHOD_KINDS.register("fsdfm", MethodKind("fsdfm", "dfm", ("cumulative_scalar", "euler", "mixture_euler"), _fsdfm_stage,
                                          teacher_kind="dfm", distill_cls=StudentSpec, exact_teacher=True))
# The exact denoiser of an oracle source: sampled by the DFM sampling loop with every rule, nothing trained.
METHOD_KINDS.register("exact", MethodKind("exact", "exact", ("cumulative_scalar", "euler", "mixture_euler", "mdlm"),
                                          _exact_stage, oracle_only=True))
METHOD_KINDS.register("released", MethodKind(
    "released", "dfm", ("cumulative_scalar", "euler", "mixture_euler"), _released_stage, teacher_kind="released",
    teacher_optional=True, checkpoint_cls=ReleasedCheckpoint, ends_before_one=lambda m: m.loss == "gkl" and m.checkpoint.get("which") == "teacher"))
METHOD_KINDS.register("ar", MethodKind("ar", "ar", ("ancestral",), _ar_stage))
METHOD_KINDS.register("flm", MethodKind("flm", "flm", ("euler",), _flm_stage, distill_cls=FLMConfig))
METHOD_KINDS.register("fmlm", MethodKind("fmlm", "fmlm", ("flow_map",), _fmlm_stage, teacher_kind="flm",
                                         distill_cls=FMLMConfig))


def validate_methods(spec: StudySpec, file: str) -> None:
    """Method kinds, teachers (existing, of the right kind, acyclic), rules, step budgets, distill settings."""
    from fsdfm.metrics.registry import METRICS
    for name, m in spec.methods.items():
        where = f"methods.{name}"
        if m.kind not in METHOD_KINDS:
            raise SpecError(f"{file}: {where}.kind: unknown method kind {short(m.kind)}{did_you_mean(m.kind, METHOD_KINDS.names())}; "
                            f"allowed: {', '.join(METHOD_KINDS.names())}")
        kind = METHOD_KINDS.get(m.kind)
        if kind.checkpoint_cls is not None:
            if not m.checkpoint:
                raise SpecError(f"{file}: {where}.checkpoint: a {m.kind} method needs {{path: <file.pth>, which: "
                                f"{' | '.join(RELEASED_ENTRIES)}}}")
            build(kind.checkpoint_cls, m.checkpoint, f"{where}.checkpoint", file)
        elif m.checkpoint:
            raise SpecError(f"{file}: {where}.checkpoint: only a method of kind released reads a checkpoint; a {m.kind} "
                            f"method is trained by the study")
        if name == EXACT_TEACHER:
            raise SpecError(f"{file}: methods.{name}: the method name {EXACT_TEACHER!r} is reserved for `teacher: exact` "
                            "(the exact posterior); rename the method")
        if kind.oracle_only and spec.data.kind != "oracle":
            raise SpecError(f"{file}: {where}.kind: an {m.kind} method needs data.kind: oracle (a source with an exact "
                            f"posterior); data.kind is {spec.data.kind!r}")
        if m.teacher == EXACT_TEACHER:
            if not kind.exact_teacher:
                raise SpecError(f"{file}: {where}.teacher: a {m.kind} method cannot use teacher {EXACT_TEACHER!r}")
            if spec.data.kind != "oracle":
                raise SpecError(f"{file}: {where}.teacher: teacher {EXACT_TEACHER!r} (the exact posterior) needs "
                                f"data.kind: oracle; data.kind is {spec.data.kind!r}")
            if kind.teacher_kind and m.distill.get("shortcut", "rk4") not in FROZEN_TEACHER_SHORTCUTS:
                raise SpecError(f"{file}: {where}.distill.shortcut: with teacher {EXACT_TEACHER!r} the exact posterior "
                                f"is the frozen teacher: set shortcut to one of {', '.join(FROZEN_TEACHER_SHORTCUTS)}")
        elif kind.teacher_kind and (m.teacher is not None or not kind.teacher_optional):
            if m.teacher is None:
                raise SpecError(f"{file}: {where}.teacher: a {m.kind} student needs a teacher (a method of kind {kind.teacher_kind})")
            if m.teacher not in spec.methods:
                known = list(spec.methods) + ([EXACT_TEACHER] if kind.exact_teacher else [])
                raise SpecError(f"{file}: {where}.teacher: unknown method {short(m.teacher)}{did_you_mean(m.teacher, known)}")
            if spec.methods[m.teacher].kind != kind.teacher_kind:
                raise SpecError(f"{file}: {where}.teacher: {short(m.teacher)} is a {spec.methods[m.teacher].kind} method; "
                                f"a {m.kind} student distils from a {kind.teacher_kind} method")
        elif m.teacher is not None:
            raise SpecError(f"{file}: {where}.teacher: a {m.kind} method has no teacher")
        if m.source not in ("mask", "uniform"):
            raise SpecError(f"{file}: {where}.source: must be mask or uniform, got {short(m.source)}{did_you_mean(m.source, ['mask', 'uniform'])}")
        try:
            DFMConfig(m.loss)
        except (ValueError, KeyError) as e:
            raise SpecError(f"{file}: {where}.loss: {e}") from None
        for rule in m.rules:
            if rule not in kind.rules:
                raise SpecError(f"{file}: {where}.rules: {short(rule)} is not a rule of {m.kind}{did_you_mean(str(rule), list(kind.rules))}; "
                                f"allowed: {', '.join(kind.rules)}")
        if not m.steps:
            raise SpecError(f"{file}: {where}.steps: list the step budgets to evaluate, e.g. [1, 8, 64]")
        for s in m.steps:
            if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 4096:
                raise SpecError(f"{file}: {where}.steps: step budgets are integers in 1..4096, got {short(s)}")
        if kind.distill_cls is NoDistill and m.distill:
            raise SpecError(f"{file}: {where}.distill: a {m.kind} method takes no distill settings")
        if dataclasses.is_dataclass(kind.distill_cls):
            build(kind.distill_cls, m.distill, f"{where}.distill", file)
    for n in spec.metrics.names:
        if n not in METRICS:
            raise SpecError(f"{file}: metrics.names: unknown metric {short(n)}{did_you_mean(n, METRICS.names())}")
    validate_pairs(spec, file)


def validate_pairs(spec: StudySpec, file: str) -> None:
    """Each side of report.pairs names a method of the spec, one of its rules and one of its step budgets."""
    from fsdfm.specs import PAIR_PATTERN

    for i, pair in enumerate(spec.report.pairs):
        for side in pair:
            where = f"{file}: report.pairs[{i}]: {side!r}"
            g = PAIR_PATTERN.match(side).groupdict()
            m = spec.methods.get(g["method"])
            if m is None:
                raise SpecError(f"{where}: unknown method {g['method']!r}{did_you_mean(g['method'], list(spec.methods))}")
            rules = list(m.rules or METHOD_KINDS.get(m.kind).rules[:1])
            if g["rule"] is not None and g["rule"] not in rules:
                raise SpecError(f"{where}: {g['method']} is not sampled with rule {g['rule']!r}"
                                f"{did_you_mean(g['rule'], rules)}; its rules: {', '.join(rules)}")
            if int(g["steps"]) not in m.steps:
                raise SpecError(f"{where}: {g['method']} is not sampled at {g['steps']} steps; "
                                f"its step budgets: {', '.join(map(str, m.steps))}")


def plan_study(name: str, cells: list[Cell]) -> StudyPlan:
    """Expand every grid cell into stages and runs (deduplicated by stage id and by run content)."""
    stages: dict[str, Stage] = {}
    runs: dict[str, dict] = {}
    grid_keys = sorted({k for c in cells for k in c.params})

    def add_run(params: dict, final: Stage, cell: dict):
        key = final.id + "|" + "|".join(f"{k}={params[k]}" for k in sorted(params))
        if key in runs:  # the same run reached from another cell: grid values it does not depend on become None
            for k in grid_keys:
                if runs[key]["params"].get(k) != cell.get(k):
                    runs[key]["params"][k] = None
            return
        runs[key] = {"params": {**params, **{k: cell.get(k) for k in grid_keys}}, "stage_id": final.id}

    for cell in cells:
        spec, p = cell.spec, Planner(cell.spec, stages)
        ev = p.evaluator_stage()
        ev_inputs = {"evaluator": ev.id} if ev is not None else {}
        eval_cfg = {"data": p.data, "metrics": dataclasses.asdict(spec.metrics), "n_samples": spec.sampling.n_samples,
                    "seed": spec.sampling.seed, "evaluator": dataclasses.asdict(spec.evaluator)}
        eval_cfg["metrics"].pop("pos_divergence")
        eval_cfg["evaluator"].pop("train")
        if spec.data_reference:
            ref = p.add(Stage("evaluate_data", eval_cfg, ev_inputs))
            add_run({"method": "data", "kind": "data", "label": "data (held-out)", "rule": None, "steps": None}, ref, cell.params)
        for mname, m in spec.methods.items():
            kind = METHOD_KINDS.get(m.kind)
            model = p.model_stage(mname)
            t_end = 1.0 - spec.sampling.eps if kind.ends_before_one(m) else 1.0
            for rule in (m.rules or kind.rules[:1]):
                for steps in m.steps:
                    sample = p.add(Stage("sample", {
                        "data": p.data, "sampler": kind.sampler, "rule": rule, "steps": steps, "t_end": t_end,
                        "n_samples": spec.sampling.n_samples, "batch_size": spec.sampling.batch_size,
                        "seed": spec.sampling.seed, "precision": spec.sampling.precision}, {"model": model.id}))
                    ev_stage = p.add(Stage("evaluate", eval_cfg, {"samples": sample.id, **ev_inputs}))
                    add_run({"method": mname, "kind": m.kind, "label": m.label or mname, "rule": rule, "steps": steps},
                            ev_stage, cell.params)
            pd = spec.metrics.pos_divergence
            if pd is not None and kind.sampler == "dfm" and m.teacher is not None and m.teacher != EXACT_TEACHER:
                for k in pd.student_steps:
                    cfg = {"data": p.data, **dataclasses.asdict(pd), "student_steps": k, "seed": spec.sampling.seed,
                           "precision": spec.sampling.precision}
                    div = p.add(Stage("pos_divergence", cfg, {"teacher": p.model_stage(m.teacher).id, "student": model.id}))
                    add_run({"method": mname, "kind": "pos_divergence", "label": f"{m.label or mname} vs {m.teacher}",
                             "rule": "cumulative_scalar", "steps": k}, div, cell.params)
    run_list = []
    for i, r in enumerate(runs.values()):
        prm = r["params"]
        run_id = f"{prm['method']}/{prm['rule']}/{prm['steps']}/" + ",".join(f"{k}={prm[k]}" for k in grid_keys) + f"#{i}"
        run_list.append(RunSpec(run_id=run_id, params=prm, stage_id=r["stage_id"]))
    rs = cells[0].spec.report if cells else None
    report = {"mauve_min_n": rs.mauve_min_n, "pairs": [list(p) for p in rs.pairs]} if rs is not None else {}
    # tracking settings go to plan.json, not into any stage config: a tracked study has the same stage ids
    ts = cells[0].spec.tracking if cells else None
    return StudyPlan(name=name, stages=stages, runs=run_list, report=report,
                     tracking=ts.to_plan() if ts is not None else {})
