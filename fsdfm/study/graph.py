"""Stages: the units of work a study expands into, and the graph they form.

A `Stage` is one call of a registered stage function on a resolved config, with named inputs that are other
stages' ids (train -> distil -> sample -> evaluate). Its id is content-addressed:

    id = f"{kind}-{sha256(canonical_json({"kind": kind, "config": config, "inputs": inputs,
                                          "fingerprint": fingerprint}))[:12]}"

where `fingerprint` holds what decides the result besides the config and the inputs: the version of the stage
kind and of each metric it computes, and the sha256 of the data files it reads (see `fsdfm.fingerprint`; the
planner fills it in). A stage without a fingerprint hashes as before, without the key.

where canonical_json sorts keys, uses no whitespace (separators "," and ":"), escapes non-ASCII and refuses
NaN/inf. Because `inputs` holds the input stages' *ids*, a changed setting (or code version, or data file)
changes the id of its stage and of every stage downstream of it, and nothing else: a teacher shared by ten
ablations is one stage, trained once.
Note that the hash sees JSON values, so `1` and `1.0` are different configs: resolve configs to one type.

A stage function has the signature

    fn(config: dict, inputs: dict[str, Path], out_dir: Path) -> dict

`inputs` maps each input name to that input stage's output directory, `out_dir` is the stage's own directory
(artefacts go there; a checkpointable stage keeps its checkpoints there and resumes from them), and the
returned dict is the payload of the stage's record (conventionally `{"metrics": {...}, ...}`).
Stage functions are registered by name in `STAGE_KINDS` with the `stage_kind` decorator.

A `StudyPlan` is the expanded study: every stage by id plus the runs (one grid point x method each) and the
final stage of each run. `waves(plan)` orders the stages into topological layers that can run in parallel.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fsdfm.io import canonical_json
from fsdfm.registry import Registry

StageFn = Callable[[dict, "dict[str, Path]", Path], dict]


class PlanError(ValueError):
    """An inconsistent study plan: an unknown input, a cycle, a duplicate run, a mismatched id."""


def _jsonable_copy(obj: Any, where: str) -> Any:
    """A deep copy of `obj` made of JSON types only (tuples become lists); a clear error names what is not."""

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if not isinstance(k, str):
                    raise TypeError(f"{where}: key {k!r} at {path or '<root>'} is not a string (configs are JSON)")
                out[k] = walk(v, f"{path}.{k}" if path else k)
            return out
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            if not math.isfinite(x):
                raise ValueError(f"{where}: {path or '<root>'} = {x!r} is not finite; configs must be valid JSON")
            return x
        raise TypeError(
            f"{where}: {path or '<root>'} = {x!r} has type {type(x).__name__}; configs must be resolved to "
            "JSON values (dict, list, str, int, float, bool, None)"
        )

    return walk(obj, "")


def stage_id(kind: str, config: dict, inputs: dict[str, str], fingerprint: dict | None = None) -> str:
    """`f"{kind}-{sha256(canonical_json(kind, config, inputs[, fingerprint]))[:12]}"` (see the module docstring)."""
    content = {"kind": kind, "config": config, "inputs": inputs}
    if fingerprint:
        content["fingerprint"] = fingerprint
    text = canonical_json(content)
    return f"{kind}-{hashlib.sha256(text.encode('ascii')).hexdigest()[:12]}"


@dataclass(frozen=True, eq=False)
class Stage:
    """One unit of work: `kind` names a registered stage function, `config` is its resolved JSON config and
    `inputs` maps input names to the ids of the stages whose output directories it reads. `fingerprint` holds
    code versions and data hashes (JSON; not passed to the stage function; see `fsdfm.fingerprint`).

    `id` is computed (never passed): see `stage_id`. Stages compare and hash by id.
    """

    kind: str
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind or "/" in self.kind or self.kind.startswith("."):
            raise ValueError(f"stage kind must be a non-empty name without '/', got {self.kind!r}")
        config = _jsonable_copy(self.config, f"config of {self.kind} stage")
        if not isinstance(config, dict):
            raise TypeError(f"config of {self.kind} stage must be a dict, got {type(self.config).__name__}")
        if not isinstance(self.inputs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.inputs.items()
        ):
            raise TypeError(
                f"inputs of {self.kind} stage must map input names to stage ids (str -> str), got {self.inputs!r}"
            )
        fingerprint = _jsonable_copy(self.fingerprint, f"fingerprint of {self.kind} stage")
        if not isinstance(fingerprint, dict):
            raise TypeError(f"fingerprint of {self.kind} stage must be a dict, got {type(self.fingerprint).__name__}")
        # copies, so that mutating the caller's dicts cannot change a stage after its id was computed
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "inputs", dict(self.inputs))
        object.__setattr__(self, "fingerprint", fingerprint)
        object.__setattr__(self, "id", stage_id(self.kind, config, self.inputs, fingerprint))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def to_dict(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "config": self.config, "inputs": self.inputs}
        if self.fingerprint:
            out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "stage") -> "Stage":
        try:
            stage = cls(
                kind=d["kind"], config=d["config"], inputs=d.get("inputs", {}), fingerprint=d.get("fingerprint") or {}
            )
        except KeyError as e:
            raise PlanError(f"{where}: missing key {e.args[0]!r} (a stage needs kind, config, inputs)") from None
        if "id" in d and d["id"] != stage.id:
            raise PlanError(
                f"{where}: stored id {d['id']!r} does not match its content (recomputed {stage.id!r}); "
                "was the file edited by hand, or written by an incompatible version?"
            )
        return stage


@dataclass(frozen=True)
class StageKind:
    """A registered stage function and how to launch it.

    checkpointable: the function saves its own checkpoints in out_dir and resumes from them, so a job that is
        preempted or times out is requeued instead of failed (and its out_dir is not cleared between attempts).
    resources: the resource class a cluster profile maps to partition/GPUs/CPUs/memory/time ("cpu", "gpu", ...).
    version: bumped whenever the function's results change for the same config and inputs; it enters the id of
        every stage of this kind (so a fix re-runs those stages and their dependents, nothing else).
        tests/test_versions.py fails when the kind's sources change without a bump (see `fsdfm.versions`).
    metrics: the metrics (names in `fsdfm.metrics.registry.METRICS`) the kind records itself, or a function
        config -> names; their versions enter the id too (evaluate stages add the names their config lists).
    sources: what computes the kind's results ("module" for a file, "module:name" for one function of a shared
        module), digested by `fsdfm.versions` to keep `version` honest; default: the stage function alone.
    model_sampler, model_rule: for a kind whose folder holds a model afterwards, the sampler (fsdfm.methods.common
        SAMPLERS) that draws from it and the update rule it uses by default (`fsdfm.load_model`); None otherwise.
    """

    fn: StageFn
    checkpointable: bool = False
    resources: str = "cpu"
    version: str = "1"
    metrics: tuple | Callable[[dict], Any] = ()
    sources: tuple = ()
    model_sampler: str | None = None
    model_rule: str | None = None

    def metric_names(self, config: dict) -> list[str]:
        """Sorted names of the metrics a stage of this kind with `config` computes."""
        names = set(self.metrics(config) if callable(self.metrics) else self.metrics)
        listed = config.get("metrics")
        if isinstance(listed, dict) and isinstance(listed.get("names"), list):
            names.update(n for n in listed["names"] if isinstance(n, str))
        return sorted(names)

    @property
    def module(self) -> str:
        """The module that registers this kind: a fresh job process imports it to find the function."""
        return self.fn.__module__

    @property
    def import_root(self) -> str | None:
        """The sys.path entry `module` is importable from (its file's directory, one level up per dot)."""
        mod = sys.modules.get(self.module)
        file = getattr(mod, "__file__", None)
        if not file:
            return None
        root = Path(file).resolve().parent
        for _ in range(self.module.count(".")):
            root = root.parent
        return str(root)


STAGE_KINDS: Registry[StageKind] = Registry("stage kind")


def stage_kind(
    name: str,
    checkpointable: bool = False,
    resources: str = "cpu",
    version: str = "1",
    metrics: tuple | Callable[[dict], Any] = (),
    sources: tuple = (),
    model_sampler: str | None = None,
    model_rule: str | None = None,
) -> Callable[[StageFn], StageFn]:
    """Register `fn(config, inputs, out_dir) -> dict` as stage kind `name` (see `StageKind` for the options);
    returns `fn` unchanged."""
    if not isinstance(version, str) or not version:
        raise ValueError(f"stage kind {name!r}: version must be a non-empty string, got {version!r}")

    def deco(fn: StageFn) -> StageFn:
        own = (f"{fn.__module__}:{fn.__qualname__}",)
        STAGE_KINDS.register(
            name,
            StageKind(
                fn=fn,
                checkpointable=checkpointable,
                resources=resources,
                version=version,
                metrics=metrics,
                sources=tuple(sources) or own,
                model_sampler=model_sampler,
                model_rule=model_rule,
            ),
        )
        return fn

    return deco


@dataclass(frozen=True)
class RunSpec:
    """One run of a study (a grid point x method): its flattened parameters (dotted names -> values, e.g.
    {"method": "fsdfm", "sampler.steps": 8, "train.seed": 1}) and the id of its final stage, whose record's
    metrics are the run's results."""

    run_id: str
    params: dict[str, Any]
    stage_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _jsonable_copy(self.params, f"params of run {self.run_id!r}"))

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "params": self.params, "stage_id": self.stage_id}


@dataclass(frozen=True, eq=False)
class StudyPlan:
    """An expanded study: stages by id and the runs. Checked on construction (see `validate`)."""

    name: str
    stages: dict[str, Stage]
    runs: list[RunSpec] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # the spec's report settings (fsdfm.study.spec.ReportSpec); no stage id
    tracking: dict = field(default_factory=dict)  # fsdfm.tracking settings ({} = off); no stage id: changes no result

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", dict(self.stages))
        object.__setattr__(self, "runs", list(self.runs))
        self.validate()

    @classmethod
    def from_stages(cls, name: str, stages: "list[Stage]", runs: "list[RunSpec]" = ()) -> "StudyPlan":
        """Build a plan from a list of stages (duplicates, i.e. shared stages, collapse to one)."""
        return cls(name=name, stages={s.id: s for s in stages}, runs=list(runs))

    def validate(self) -> None:
        """Raise `PlanError` on a bad study name, a key that is not its stage's id, an input naming an unknown
        stage, a cycle, a duplicate run id or a run whose final stage is not in the plan."""
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise PlanError(f"study name must be a non-empty directory name without '/', got {self.name!r}")
        for sid, stage in self.stages.items():
            if not isinstance(stage, Stage):
                raise PlanError(f"study {self.name!r}: stages[{sid!r}] is a {type(stage).__name__}, not a Stage")
            if sid != stage.id:
                raise PlanError(f"study {self.name!r}: stage stored under {sid!r} has id {stage.id!r}")
        seen: set[str] = set()
        for run in self.runs:
            if run.run_id in seen:
                raise PlanError(f"study {self.name!r}: run id {run.run_id!r} appears twice")
            seen.add(run.run_id)
            if run.stage_id not in self.stages:
                raise PlanError(
                    f"study {self.name!r}: run {run.run_id!r} ends in stage {run.stage_id!r}, which is not in the plan"
                )
        waves(self)  # missing inputs and cycles

    def ancestors(self, sid: str) -> list[str]:
        """Ids of every stage `sid` depends on, transitively (not including `sid`)."""
        out: list[str] = []
        todo = list(self.stages[sid].inputs.values())
        while todo:
            s = todo.pop()
            if s not in out:
                out.append(s)
                todo.extend(self.stages[s].inputs.values())
        return out

    def to_dict(self) -> dict:
        """The JSON form written to plan.json (with, per kind, the module a job imports to find it)."""
        kinds = {}
        for kind in sorted({s.kind for s in self.stages.values()}):
            if kind in STAGE_KINDS:
                k = STAGE_KINDS.get(kind)
                kinds[kind] = {
                    "module": k.module,
                    "import_root": k.import_root,
                    "checkpointable": k.checkpointable,
                    "resources": k.resources,
                }
        return {
            "name": self.name,
            "kinds": kinds,
            "stages": {sid: s.to_dict() for sid, s in self.stages.items()},
            "runs": [r.to_dict() for r in self.runs],
            **({"report": self.report} if self.report else {}),
            **({"tracking": self.tracking} if self.tracking else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "StudyPlan":
        try:
            stages = {sid: Stage.from_dict(s, f"{where}: stages[{sid!r}]") for sid, s in d["stages"].items()}
            runs = [RunSpec(run_id=r["run_id"], params=r["params"], stage_id=r["stage_id"]) for r in d["runs"]]
            return cls(
                name=d["name"],
                stages=stages,
                runs=runs,
                report=dict(d.get("report") or {}),
                tracking=dict(d.get("tracking") or {}),
            )
        except KeyError as e:
            raise PlanError(f"{where}: missing key {e.args[0]!r}") from None


def waves(plan: "StudyPlan | Mapping[str, Stage]") -> list[list[Stage]]:
    """Topological layers: wave k holds the stages whose inputs all lie in waves < k.

    `plan` is a StudyPlan or any mapping id -> Stage (the graph is read from the keys and each stage's
    `inputs`). Within a wave, stages keep the mapping's order (so submissions are reproducible). Raises
    `PlanError` for an input id that is not in the plan, and for a cycle (naming the stages on it); content
    hashing makes a cycle impossible among honest ids, but a hand-edited plan can still contain one.
    """
    name = plan.name if isinstance(plan, StudyPlan) else "<stages>"
    stages = dict(plan.stages if isinstance(plan, StudyPlan) else plan)
    for sid, stage in stages.items():
        for inp, dep in stage.inputs.items():
            if dep not in stages:
                raise PlanError(
                    f"study {name!r}: stage {sid!r} input {inp!r} refers to stage {dep!r}, which is not in the plan"
                )
    placed: set[str] = set()
    remaining = dict(stages)
    out: list[list[Stage]] = []
    while remaining:
        ready = [sid for sid, s in remaining.items() if all(d in placed for d in s.inputs.values())]
        if not ready:
            raise PlanError(f"study {name!r}: dependency cycle: {' -> '.join(_find_cycle(remaining))}")
        placed.update(ready)
        out.append([remaining.pop(sid) for sid in ready])
    return out


def _find_cycle(stages: dict[str, Stage]) -> list[str]:
    """One cycle among `stages` (each of which has an unresolved input), as a closed list of ids."""
    sid = next(iter(stages))
    path: list[str] = []
    while sid not in path:
        path.append(sid)
        sid = next(d for d in stages[sid].inputs.values() if d in stages)
    return path[path.index(sid) :] + [sid]
