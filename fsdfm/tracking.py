"""Experiment tracking, optional and off by default: per-step training curves, final metrics and hyperparameters to
TensorBoard (or MLflow).

Turned on by a spec's `tracking:` section or by `fsdfm run --track` (`fsdfm.run_study(..., track=True)`):

    tracking: {backend: tensorboard, dir: tracking}    # dir: relative to results/<study>/ (the default), or absolute

Each stage that runs logs to its own event folder `<dir>/<stage_id>/` (a TensorBoard "run"):
    train/loss, train/lr, train/tokens_per_s   every optimizer step of a training stage (fsdfm.train.fit);
                                               tokens_per_s = tokens of the step / its wall-clock
    metrics/<name>                             every scalar of the stage's record payload `metrics` when it finishes
                                               (an evaluate stage: the run's final metrics), at the final step
    stage (text)                               the stage kind, its id and the run ids that end in it
    hparams                                    the stage's config flattened with dots (`optim.lr`, `rule`, ...) and
                                               the run's parameters (`run.method`, `run.steps`, `run.seed`, ...),
                                               against its final metrics: TensorBoard's HPARAMS tab
`tensorboard --logdir results/<study>/tracking` shows them; they are plain event files
(`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` reads them in a notebook).

`backend: mlflow` (`pip install 'fsdfm[mlflow]'`) logs the same to MLflow, one MLflow run per stage (run name: the
stage id) in the experiment named after the study: scalars as metrics with their step, hyperparameters as params,
texts as artifacts. The store is `$MLFLOW_TRACKING_URI` when set (a server, `sqlite:///...`), else the file store
`file:<dir>/mlruns` (offline; MLflow 3 keeps it in maintenance mode, so fsdfm opts in with
`MLFLOW_ALLOW_FILE_STORE=true`); `mlflow ui --backend-store-uri file:results/<study>/tracking/mlruns` shows it.

Why TensorBoard: it is file based (no account, no server, nothing leaves the machine: offline by construction),
it is maintained, torch ships its writer (`torch.utils.tensorboard.SummaryWriter`), and every notebook reads it.
MLflow is there for labs whose dashboards live in it. W&B is not offered: its offline mode starts a separate
service process per run and its files are binary records that need `wandb sync` to be read anywhere.

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

    def hparams(self, params: dict, metrics: dict) -> None:
        """Log the stage's hyperparameters `params` (flat: name -> int, float, str or bool) against its final
        `metrics` (tag -> value, tags already logged as scalars)."""

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

    def __init__(self, folder: Path, **_: Any):
        self.check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def hparams(self, params: dict, metrics: dict) -> None:
        # into this stage's own event folder (SummaryWriter.add_hparams would open a new, timestamped sub-run)
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(params, metrics):
            writer.add_summary(summary)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@TRACKERS.register("mlflow")
class MLflowTracker(Tracker):
    """One MLflow run per stage, in the experiment named after the study (module docstring); `pip install
    'fsdfm[mlflow]'`."""

    @classmethod
    def check_available(cls) -> None:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise RuntimeError("tracking backend 'mlflow' needs the mlflow package: pip install 'fsdfm[mlflow]'")

    def __init__(self, folder: Path, study: str = "fsdfm", stage_id: str | None = None, **_: Any):
        self.check_available()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (folder.parent / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(study)
        exp_id = exp.experiment_id if exp is not None else self._create_experiment(study)
        self.run_id = self.client.create_run(exp_id, run_name=stage_id or folder.name).info.run_id

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - a concurrent stage created it first: use theirs
            return self.client.get_experiment_by_name(name).experiment_id

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, float(value), step=int(step))

    def text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")

    def hparams(self, params: dict, metrics: dict) -> None:
        from mlflow.entities import Param

        # MLflow caps a value at 6,000 characters; a config value is never near that, but a long list could be
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_ACTIVE: list[Tracker] = []  # the tracker of the stage running in this process (at most one)


def hparam_values(config: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) config flattened with dots into hyperparameters: int, float, str and bool kept, None as "none",
    lists and other values as their text (TensorBoard's hparams and MLflow's params take scalars only)."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(hparam_values(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if config is None:
        out[key] = "none"
    elif isinstance(config, (bool, int, float, str)):
        out[key] = config
    else:
        out[key] = str(list(config) if isinstance(config, tuple) else config)
    return out


@contextlib.contextmanager
def stage_tracking(
    settings: dict | None,
    study_dir: str | os.PathLike,
    stage_id: str,
    kind: str,
    run_ids: list[str] = (),
    config: dict | None = None,
    run_params: dict | None = None,
) -> Iterator[Tracker | None]:
    """While a stage runs: its tracker (None when tracking is off), active for `train_logger`. `config` (the
    stage's) and `run_params` (the run it ends, if any) are its hyperparameters, logged by `log_final`."""
    if not settings:
        yield None
        return
    tracker = TRACKERS.get(settings.get("backend", "tensorboard"))(
        log_dir(settings, study_dir) / stage_id, study=Path(study_dir).name, stage_id=stage_id
    )
    tracker.pending_hparams = {
        "kind": kind,
        **hparam_values(config or {}),
        **hparam_values({"run": run_params} if run_params else {}),
    }
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
    """Every scalar of a finished stage's payload metrics as metrics/<name> at `step`, then the stage's
    hyperparameters against them (`Tracker.hparams`)."""
    if tracker is None:
        return
    final = {f"metrics/{name}": value for name, value in scalar_metrics((payload or {}).get("metrics")).items()}
    for tag, value in final.items():
        tracker.scalar(tag, value, step)
    params = getattr(tracker, "pending_hparams", None)
    if params:
        tracker.hparams(params, final)
