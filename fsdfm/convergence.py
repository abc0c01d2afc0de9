"""Convergence, shown: the stopping rule a spec can state for a training stage (`train: {until: ...}`).

    until: {metric: val_nll, patience: 5, every: 100, min_delta: 0.001}

`fsdfm.train.fit` evaluates held-out metrics every `every` steps into the stage's curve; the rule fires once the
last `patience` evaluations of `metric` (lower is better) all stay above best_before - min_delta, best_before the
best value before them. `train.steps` is the maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Until", "stopping_rule_fires"]


@dataclass(frozen=True)
class Until:
    """The stopping rule `until: {metric, patience, every, min_delta}`: evaluate every `every` steps; stop after
    `patience` evaluations in a row without `metric` (lower is better) falling below best - min_delta."""

    metric: str
    patience: int
    every: int
    min_delta: float = 0.0

    @classmethod
    def parse(cls, raw, curve_every: int | None) -> "Until":
        if not isinstance(raw, dict):
            raise ValueError(f"optim.until must be a mapping {{metric, patience, every, min_delta}}, got {raw!r}")
        unknown = sorted(set(raw) - {"metric", "patience", "every", "min_delta"})
        if unknown:
            raise ValueError(
                f"optim.until: unknown key(s) {unknown}; allowed: metric, patience, every, min_delta "
                "(the maximum is train.steps)"
            )
        metric, patience = raw.get("metric"), raw.get("patience")
        every = raw.get("every", curve_every)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"optim.until.metric must name a curve metric (e.g. val_nll), got {metric!r}")
        for name, v in (("patience", patience), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"optim.until.{name} must be an integer >= 1, got {v!r}")
        min_delta = raw.get("min_delta", 0.0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"optim.until.min_delta must be a number >= 0, got {min_delta!r}")
        return cls(metric, int(patience), int(every), float(min_delta))


def stopping_rule_fires(curve: list, until: dict | None) -> bool:
    """Whether the rule `until` (an `Until` as a dict) ends training on the curve so far ([{step, metric: value}]):
    no improvement beyond min_delta in the last `patience` points. A metric the curve lacks is a KeyError."""
    if not until or not curve:
        return False
    vals = [c.get(until["metric"]) for c in curve]
    if vals[-1] is None:
        raise KeyError(f"optim.until.metric {until['metric']!r} is not a curve metric; recorded: {list(curve[-1])}")
    if len(vals) <= until["patience"]:
        return False
    best_before = min(vals[: -until["patience"]])
    return min(vals[-until["patience"] :]) > best_before - until["min_delta"]
