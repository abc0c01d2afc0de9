"""Experiment tracking, optional and off by default: per-step training curves and final metrics to TensorBoard.

Turned on by a spec's `tracking:` section or by `fsdfm run --track` (`fsdfm.run_study(..., track=True)`):

    tracking: {backend: tensorboard, dir: tracking}    # dir: relative to results/<study>/ (the default), or absolute

Each stage that runs logs to its own event folder `<dir>/<stage_id>/` (a TensorBoard "run"):
    train/loss, train/lr, train/tokens_per_s   every optimizer step of a training stage (fsdfm.train.fit);
                                               tokens_per_s = tokens of the step / its wall-clock
    metrics/<name>                             every scalar of the stage's record payload `metrics` when it finishes
                                               (an evaluate stage: the run's final metrics), at the final step
    stage (text)                               the stage kind, its id and the run ids that end in it
`tensorboard --logdir results/<study>/tracking` shows them; they are plain event files
(`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` reads them in a notebook).

Why TensorBoard: it is file based (no account, no server, nothing leaves the machine: offline by construction),
it is maintained, torch ships its writer (`torch.utils.tensorboard.SummaryWriter`), and every notebook reads it.
W&B and MLflow need a service or an offline-sync mode to remember; neither adds anything these scalars need.

Tracking changes no result, so it is not part of any stage config and does not enter stage ids: the settings live
in plan.json beside the stages (`StudyPlan.tracking`), and a study tracked or not has the same ids. Only rank 0 of
a DDP job logs (other ranks never open a tracker).
"""

from __future__ import annotations

import abc

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from fsdfm.registry import Registry

DEFAULT_DIR = "tracking"
TRACKERS: Registry = Registry("tracking backend")


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """The spec's `tracking:` section. backend: a TRACKERS name; dir: the event folder root, relative to the
    study's results folder unless absolute; enabled: false keeps the section but logs nothing."""

    backend: str = "tensorboard"
    dir: str = DEFAULT_DIR
    enabled: bool = True

    def __post_init__(self):
        TRACKERS.get(self.backend)  # an unknown backend: UnknownNameError with did-you-mean
        if not isinstance(self.dir, str) or not self.dir:
            raise ValueError(f"dir must be a non-empty path, got {self.dir!r}")

    def to_plan(self) -> dict:
        """What plan.json keeps ({} when disabled)."""
        return {"backend": self.backend, "dir": self.dir} if self.enabled else {}


def enable(plan, spec: TrackingSpec | None = None):
    """The plan with tracking on (`--track`): the spec's `tracking:` section (even one with enabled: false), else
    the defaults. Stage ids are unchanged (tracking is not in them)."""
    if plan.tracking:
        return plan
    settings = dataclasses.replace(spec, enabled=True) if spec is not None else TrackingSpec()
    return dataclasses.replace(plan, tracking=settings.to_plan())


def check_available(settings: dict) -> None:
    """Raise RuntimeError (before anything runs) when the backend of tracking settings cannot be imported."""
    if settings:
        TRACKERS.get(settings.get("backend", "tensorboard")).check_available()


def log_dir(settings: dict, study_dir: str | os.PathLike) -> Path:
    """The event folder root of a plan's tracking settings (absolute: a job may run in another directory)."""
    d = Path(settings.get("dir") or DEFAULT_DIR).expanduser()
    return Path(os.path.abspath(d if d.is_absolute() else Path(study_dir) / d))


class Tracker(abc.ABC):
    """One stage's tracker: scalars by tag and step, and text. Backends subclass it."""

    @classmethod
    def check_available(cls) -> None:
        """Raise RuntimeError naming what to install when the backend's package is missing."""

    @abc.abstractmethod
    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log `value` under `tag` at optimiser step `step`."""

    @abc.abstractmethod
    def text(self, tag: str, text: str) -> None:
        """Log a text (e.g. the stage's config) under `tag`."""

    def close(self) -> None:
        pass


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """torch.utils.tensorboard.SummaryWriter on `folder` (needs the `tensorboard` package: pip install 'fsdfm[track]')."""

    @classmethod
    def check_available(cls) -> None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:  # torch's SummaryWriter imports it
            raise RuntimeError(
                "tracking backend 'tensorboard' needs the tensorboard package: pip install 'fsdfm[track]'"
            )

    def __init__(self, folder: Path):
        self.check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


_ACTIVE: list[Tracker] = []  # the tracker of the stage running in this process (at most one)


@contextlib.contextmanager
def stage_tracking(
    settings: dict | None, study_dir: str | os.PathLike, stage_id: str, kind: str, run_ids: list[str] = ()
) -> Iterator[Tracker | None]:
    """While a stage runs: its tracker (None when tracking is off), active for `train_logger`."""
    if not settings:
        yield None
        return
    tracker = TRACKERS.get(settings.get("backend", "tensorboard"))(log_dir(settings, study_dir) / stage_id)
    tracker.text("stage", f"{kind} {stage_id}" + "".join(f"\n\nrun {r}" for r in run_ids))
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.remove(tracker)
        tracker.close()


def train_logger() -> Callable[[int, float, float, float], None] | None:
    """log(step, loss, lr, tokens_per_s) for the training loop, or None when no tracker is active (so the loop
    pays nothing when tracking is off)."""
    if not _ACTIVE:
        return None
    tracker = _ACTIVE[-1]

    def log(step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        tracker.scalar("train/loss", loss, step)
        tracker.scalar("train/lr", lr, step)
        tracker.scalar("train/tokens_per_s", tokens_per_s, step)

    return log


def scalar_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """The finite-or-not numeric scalars of a (nested) metrics mapping, flattened with dots; lists and text skipped."""
    out: dict[str, float] = {}
    if not isinstance(metrics, dict):
        return out
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalar_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def log_final(tracker: Tracker | None, payload: dict, step: int = 0) -> None:
    """Every scalar of a finished stage's payload metrics as metrics/<name> at `step`."""
    if tracker is None:
        return
    for name, value in scalar_metrics((payload or {}).get("metrics")).items():
        tracker.scalar(f"metrics/{name}", value, step)
