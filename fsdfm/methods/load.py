"""Loading a study against the method kinds: the checks of a whole spec that need the kinds, and the loader.

fsdfm.study.load reads, overrides, expands and checks a spec against the schema every study shares; the functions
here are the same loaders with `validate_methods` as their `checks`, which checks each method against its kind
(teachers existing, of the right kind and acyclic; rules the kind accepts; step budgets; the kind's own settings,
built into `MethodSpec.settings`) and the report's pairs. Use these (`fsdfm.methods.load.load_spec`, `load`) for
a spec that is going to be planned.
"""

from __future__ import annotations

import dataclasses
import functools

from fsdfm.methods.base import EXACT_TEACHER, METHOD_KINDS, MethodKind, MixtureRules
from fsdfm.metrics.registry import METRICS
from fsdfm.objectives import DFMConfig
from fsdfm.registry import did_you_mean
from fsdfm.sampling import WHOLE_STEP, knob_errors
from fsdfm.study import load as schema
from fsdfm.study.spec import PAIR_PATTERN, MethodSpec, SchedulerSpec, SpecError, StudySpec, build, short

__all__ = [
    "CHECKS",
    "expand",
    "load",
    "load_spec",
    "load_spec_dict",
    "resolve",
    "validate_methods",
    "validate_pairs",
]


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


# the mixture path's settings of a method (MethodSpec fields) and their defaults
PATH_SETTINGS = {"source": "mask", "scheduler": SchedulerSpec(), "loss": "ce"}


def check_path_settings(kind: MethodKind, m: MethodSpec, where: str, file: str) -> None:
    """`source`, `scheduler` and `loss` are read by the kinds that sample the mixture path (those that claim its
    update rules, `MixtureRules`) and checked for them; any other kind (AR, FLM, ...) would silently ignore them, so
    a value other than the default is an error there."""
    if not isinstance(kind.rules, MixtureRules):
        for key, default in PATH_SETTINGS.items():
            if getattr(m, key) != default:
                raise SpecError(
                    f"{file}: {where}.{key}: a {m.kind} method does not sample the mixture path, so it has no {key}"
                )
        return
    if m.source not in ("mask", "uniform"):
        raise SpecError(
            f"{file}: {where}.source: must be mask or uniform, got {short(m.source)}"
            f"{did_you_mean(m.source, ['mask', 'uniform'])}"
        )
    try:
        DFMConfig(m.loss)
    except (ValueError, KeyError) as e:
        raise SpecError(f"{file}: {where}.loss: {e}") from None


def check_knobs(m: MethodSpec, kind: MethodKind, seq_len: int, where: str, file: str) -> None:
    """Sampler knobs (fsdfm.sampling.knobs): known, valid, used by one of the method's rules, on a kind whose sampler
    reads them (a mixture-path kind: the DFM sampling loop); whole-step samplers only on a mask-source method."""
    rules = tuple(m.rules or kind.rules[:1])
    for rule in rules:
        if rule in WHOLE_STEP and m.source != "mask":
            raise SpecError(
                f"{file}: {where}.rules: {rule!r} needs the mask source; this method's source is {m.source}"
            )
    if not m.knobs:
        return
    if not isinstance(kind.rules, MixtureRules):
        key = next(iter(m.knobs)) if isinstance(m.knobs, dict) else ""
        mixture = [k for k in METHOD_KINDS if isinstance(METHOD_KINDS.get(k).rules, MixtureRules)]
        raise SpecError(
            f"{file}: {where}.knobs.{key}: a {m.kind} method's sampler takes no sampler knobs "
            f"(they apply to kinds {', '.join(mixture)})"
        )
    for key, msg in knob_errors(m.knobs, rules, m.source):
        raise SpecError(f"{file}: {where}.knobs{'.' + key if key else ''}: {msg}")
    bl = m.knobs.get("block_length")
    if bl and any(s < -(-seq_len // bl) for s in m.budgets if isinstance(s, int)):
        raise SpecError(
            f"{file}: {where}.knobs.block_length: {bl} cuts seq_len {seq_len} into {-(-seq_len // bl)} blocks; "
            f"every step budget must be at least that (budgets: {list(m.budgets)})"
        )


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
        check_path_settings(kind, m, where, file)
        for rule in m.rules:
            if rule not in kind.rules:
                raise SpecError(
                    f"{file}: {where}.rules: {short(rule)} is not a rule of {m.kind}{did_you_mean(str(rule), list(kind.rules))}; "
                    f"allowed: {', '.join(kind.rules)}"
                )
        check_knobs(m, kind, spec.data.seq_len, where, file)
        if not m.budgets:
            raise SpecError(f"{file}: {where}.budgets: list the step budgets to evaluate, e.g. [1, 8, 64]")
        for s in m.budgets:
            if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 4096:
                raise SpecError(f"{file}: {where}.budgets: step budgets are integers in 1..4096, got {short(s)}")
        settings = _section(kind, m, "distill", where, file) if settings is None else settings
        typed[name] = dataclasses.replace(m, settings=settings)
        check_until(spec, kind, typed[name], where, file)
    for n in spec.metrics.names:
        if n not in METRICS:
            raise SpecError(f"{file}: metrics.names: unknown metric {short(n)}{did_you_mean(n, METRICS.names())}")
    spec = dataclasses.replace(spec, methods=typed)
    validate_pairs(spec, file)
    return spec


def check_until(spec: StudySpec, kind, m, where: str, file: str) -> None:
    """A stopping rule must name a metric the kind's training curve records (the uniform source has no ELBO, so
    no val_nll): refused here rather than at the first curve evaluation, minutes into a run."""
    until = m.train.until
    if not until or kind.curve_metrics is None:
        return
    names = tuple(kind.curve_metrics(spec, m))
    if until["metric"] not in names:
        raise SpecError(
            f"{file}: {where}.train.until.metric: a {m.kind} method (source {m.source}) records no curve metric "
            f"{short(until['metric'])}{did_you_mean(until['metric'], names)}; its curve records: {', '.join(names)}"
        )


def validate_pairs(spec: StudySpec, file: str) -> None:
    """Each side of report.pairs names one setting: a method of the spec, one of its rules (the rule may be left out
    only where the method has one) and one of its step budgets."""
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
            if g["rule"] is None and len(rules) > 1:
                # the report could only skip such a pair after the run ("names 3 settings"): claims_v2 lost four
                # of its five pairs that way, so the spec is refused before anything runs
                raise SpecError(
                    f"{where}: {g['method']} is sampled with {len(rules)} rules ({', '.join(rules)}), so this names "
                    f"{len(rules)} settings; name one, e.g. '{g['method']}/{rules[0]}@{g['steps']}'"
                )
            if g["rule"] is not None and g["rule"] not in rules:
                raise SpecError(
                    f"{where}: {g['method']} is not sampled with rule {g['rule']!r}"
                    f"{did_you_mean(g['rule'], rules)}; its rules: {', '.join(rules)}"
                )
            if int(g["steps"]) not in m.budgets:
                raise SpecError(
                    f"{where}: {g['method']} is not sampled at {g['steps']} steps; "
                    f"its step budgets: {', '.join(map(str, m.budgets))}"
                )


# The checks of a cell spec that need the kinds, in order; the loaders below pass them to fsdfm.study.load.
CHECKS = (validate_methods,)
load_spec = functools.partial(schema.load_spec, checks=CHECKS)
load_spec_dict = functools.partial(schema.load_spec_dict, checks=CHECKS)
expand = functools.partial(schema.expand, checks=CHECKS)
load = functools.partial(schema.load, checks=CHECKS)
resolve = functools.partial(schema.resolve, checks=CHECKS)
