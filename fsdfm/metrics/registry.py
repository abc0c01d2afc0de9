"""One registry entry per metric: what it is, how it is ranked, what it needs and where the report shows it.

A metric computed from samples is one registered function (lm-evaluation-harness's `@register_metric` shape):

    @register_metric("rep_n", direction="min", unit="fraction", family="diversity", needs=(),
                     label="repeated 4-grams (fraction)", show={"main": 8, "seeds": 4}, target="data",
                     description="within-sample fraction of repeated 4-grams ...")
    def _rep_n(x: MetricInputs) -> MetricOutcome: ...

A metric recorded by a stage rather than computed from samples (nfe, wall_s, val_nll, posterior_kl,
pos_divergence, ...) registers its description with `recorded_by=` and no function. `METRICS.get(name)` returns
the `MetricInfo`; reports use `direction` to rank a column ("min": lower is better, "max": higher is better,
None: no better side), except that metrics with `target="data"` (entropy, distinct-n, self-BLEU, rep-n) are
ranked by distance to the data row whatever their direction (`fsdfm.report.significance`). `show` maps a report
view ("main", "seeds", "sweep", "ablation", "pairs", "cost", "pos") to the metric's position in it; `shown(view)`
lists a view's metrics in that order, so a registered metric reaches the report's tables and figures with no
edit there.

This module knows nothing about how a metric is computed (the functions live in `fsdfm.metrics.sample`,
`fsdfm.metrics.oracle`, ...) and nothing about the report's layout beyond the view names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fsdfm.registry import Registry

DIRECTIONS = ("min", "max", None)
TARGETS = (None, "data")
# What a computed metric may need besides the token ids (the inputs `fsdfm.metrics.MetricInputs` checks):
# decoded texts, an evaluator LM, held-out reference texts, the oracle source of a synthetic corpus, the training
# split's token ids (a memorisation metric compares samples with what the models were trained on).
NEEDS = ("texts", "evaluator", "references", "oracle", "train")
VIEWS = ("main", "seeds", "sweep", "ablation", "pairs", "cost", "pos")
GOAL_WORDS = {"min": "lower is better", "max": "higher is better", "data": "closest to the data is better"}


@dataclass(frozen=True)
class MetricInfo:
    """One metric: `name`, `direction` ("min" | "max" | None), `unit`, `family`, `description`, `version`, and

    target:      "data" when the goal is the data row's value (more diversity than the data is not better);
    needs:       inputs of `compute` besides the token ids (a subset of `NEEDS`);
    label:       axis label with the unit (default: "name (unit)");
    show:        ((view, position), ...): the report views that show the metric, and where;
    recorded_by: for a metric no function computes from samples, the stage or code that records it;
    compute:     the function `MetricInputs -> MetricOutcome` (None for recorded metrics);
    sources:     what computes its value ("module" or "module:name"), digested by `fsdfm.versions` to keep
                 `version` honest (default for a computed metric: its function).

    `version` is bumped whenever the metric's value can change for the same samples (a fix, a new convention);
    it enters the id of every stage that computes the metric, so only those stages re-run (tests/test_versions.py
    fails when the metric's sources change without a bump; see `fsdfm.versions`)."""

    name: str
    direction: str | None
    unit: str
    family: str
    description: str
    version: str = "1"
    target: str | None = None
    needs: tuple = ()
    label: str = ""
    show: tuple = ()
    recorded_by: str = ""
    compute: Callable | None = field(default=None, compare=False, repr=False)
    sources: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.target not in TARGETS:
            raise ValueError(f"metric {self.name!r}: target must be one of {TARGETS}, got {self.target!r}")
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"metric {self.name!r}: unknown needs {bad}; allowed: {', '.join(NEEDS)}")
        show = tuple(self.show.items()) if isinstance(self.show, Mapping) else tuple(self.show)
        bad = [v for v, _ in show if v not in VIEWS]
        if bad:
            raise ValueError(f"metric {self.name!r}: unknown report views {bad}; allowed: {', '.join(VIEWS)}")
        object.__setattr__(self, "show", show)

    @property
    def computed(self) -> bool:
        """Whether a registered function computes the metric from samples."""
        return self.compute is not None

    def position(self, view: str) -> float | None:
        """The metric's position in a report view (None: not shown there)."""
        return dict(self.show).get(view)

    @property
    def goal(self) -> str | None:
        """What "best" means for this metric, the one notion every table mark, figure axis, `fsdfm ls metrics`
        and the collapse flags share: "data" (closest to the data row's value: `target="data"`, whatever the
        direction), "min", "max", or None (no better side)."""
        return "data" if self.target == "data" else self.direction

    @property
    def better(self) -> str | None:
        """The goal in words ("lower is better", "closest to the data is better", ...); None without one."""
        return GOAL_WORDS.get(self.goal)

    def best(self, values: list[float], data: float | None = None) -> float | None:
        """The best of `values` by `goal`: the one closest to `data` for a data-target metric (None without the
        data value), else the lowest / highest (None when the metric has no direction)."""
        if not values or self.goal is None:
            return None
        if self.goal == "data":
            return None if data is None else min(values, key=lambda v: abs(v - data))
        return min(values) if self.goal == "min" else max(values)


METRICS: Registry[MetricInfo] = Registry("metric", discover=("fsdfm.metrics",))


def register_metric(
    name: str,
    *,
    direction: str | None,
    unit: str,
    family: str,
    description: str,
    version: str = "1",
    target: str | None = None,
    needs: tuple = (),
    label: str = "",
    show: Mapping[str, float] | tuple = (),
    recorded_by: str = "",
    sources: tuple = (),
) -> Any:
    """Register metric `name`. With `recorded_by`, the description alone is registered and its `MetricInfo`
    returned; otherwise a decorator is returned that registers the function computing it from samples."""

    def info(fn: Callable | None) -> MetricInfo:
        own = (f"{fn.__module__}:{fn.__qualname__}",) if fn is not None else ()
        return MetricInfo(
            name,
            direction,
            unit,
            family,
            description,
            version,
            target,
            tuple(needs),
            label,
            show,
            recorded_by,
            fn,
            tuple(sources) or own,
        )

    if recorded_by:
        return METRICS.register(name, info(None))
    info(None)  # a bad direction / view / need is an error here, at the decorator, not when the function is added

    def decorator(fn: Callable) -> Callable:
        METRICS.register(name, info(fn))
        return fn

    return decorator


def unregister_metric(name: str) -> MetricInfo:
    """Remove a metric (tests register toy metrics for their duration); returns its entry."""
    entry = METRICS.get(name)
    del METRICS._items[name]  # Registry has no public removal: only tests take entries out
    return entry


def shown(view: str) -> tuple[str, ...]:
    """The metrics a report view shows, in their `show` positions (ties: by name)."""
    if view not in VIEWS:
        raise ValueError(f"unknown report view {view!r}; allowed: {', '.join(VIEWS)}")
    infos = [METRICS.get(n) for n in METRICS.names()]
    return tuple(
        i.name
        for i in sorted((i for i in infos if i.position(view) is not None), key=lambda i: (i.position(view), i.name))
    )


def data_target_metrics() -> tuple[str, ...]:
    """Metrics ranked by distance to the data row (`target="data"`)."""
    return tuple(n for n in METRICS.names() if METRICS.get(n).target == "data")


def axis_label(name: str) -> str:
    """The metric's axis label with its unit (its `label`, else "name (unit)")."""
    info = METRICS.get(name)
    return info.label or (f"{name} ({info.unit})" if info.unit else name)


# --- likelihood, recorded by the training/evaluation stage of methods that have a bound
register_metric(
    "val_nll",
    direction="min",
    unit="nats/token",
    family="likelihood",
    description="held-out NLL (or its upper bound) per token",
    recorded_by="the training / likelihood-evaluation stage",
    sources=("fsdfm.methods.dfm:dfm_validation", "fsdfm.ar:ar_nll"),
)
register_metric(
    "elbo_ppl",
    direction="min",
    unit="ppl",
    family="likelihood",
    description="exp(val_nll): perplexity bound on held-out data",
    recorded_by="the training / likelihood-evaluation stage",
    sources=("fsdfm.methods.dfm:dfm_validation", "fsdfm.ar:ar_nll"),
)
