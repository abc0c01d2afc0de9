"""Experiment tracking (fsdfm.tracking), offline: the TensorBoard event files hold the record's per-step losses and
final metrics; tracking is off by default and never changes a stage id."""

from __future__ import annotations

import copy

import numpy as np
import torch
import pytest
import yaml

from fsdfm.cli import main
from fsdfm.methods import plan_study
from fsdfm.records import load_records
from fsdfm.methods.load import load_spec_dict
from fsdfm.study.spec import SpecError
from fsdfm.train import OptimConfig, lr_factor
from tensorboard.backend.event_processing import event_accumulator  # the `track` extra (in `all`)

SPEC = {
    "name": "tracked",
    "data": {
        "kind": "oracle",
        "seq_len": 8,
        "oracle": {
            "source": "markov",
            "vocab_size": 6,
            "order": 1,
            "support": 2,
            "epsilon": 0.001,
            "seed": 1,
            "n_train": 64,
            "n_valid": 16,
        },
    },
    "model": {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2},
    "sampling": {"n_samples": 4, "batch_size": 4, "seed": 0},
    "evaluator": {"kind": "none"},
    "methods": {
        "dfm": {
            "kind": "dfm",
            "train": {"steps": 5, "batch_size": 4, "warmup_steps": 2, "lr": 0.01, "ema_decay": None},
            "rules": ["euler"],
            "budgets": [2],
        }
    },
    "metrics": {"names": ["entropy_nats", "oracle_nll"]},
}


def _events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The study run with `fsdfm run --track` (no tracking: section: the default TensorBoard folder)."""
    tmp = tmp_path_factory.mktemp("track")
    (tmp / "tracked.yaml").write_text(yaml.safe_dump(SPEC))
    assert (
        main(["--results", str(tmp / "results"), "run", str(tmp / "tracked.yaml"), "--executor", "inline", "--track"])
        == 0
    )
    return tmp / "results" / "tracked"


@pytest.mark.slow  # runs a tiny study: ~30 s on 2 busy cores
def test_logged_losses_and_lr_are_the_records_per_step_values(tracked):
    (train,) = load_records(tracked, kind="train_dfm")
    ev = _events(tracked / "tracking" / train["stage_id"])
    curve = train["payload"]["loss_curve"]  # 5 steps: one window mean per step, i.e. the per-step losses
    assert len(curve) == 5
    assert ev["train/loss"] == [(i, float(np.float32(x))) for i, x in enumerate(curve)]  # event files hold float32
    cfg = OptimConfig(**train["config"]["optim"])
    assert ev["train/lr"] == [(i, float(np.float32(cfg.lr * lr_factor(i, cfg)))) for i in range(5)]
    assert [s for s, _ in ev["train/tokens_per_s"]] == list(range(5)) and all(
        v > 0 for _, v in ev["train/tokens_per_s"]
    )
    m = train["payload"]["metrics"]
    assert ev["metrics/train_loss_final"] == [(5, float(np.float32(m["train_loss_final"])))]


@pytest.mark.slow  # runs a tiny study: ~30 s on 2 busy cores
def test_logged_final_metrics_equal_each_runs_record(tracked):
    evaluated = load_records(tracked, kind="evaluate") + load_records(tracked, kind="evaluate_data")
    assert len(evaluated) == 2
    for rec in evaluated:
        ev = _events(tracked / "tracking" / rec["stage_id"])
        m = rec["payload"]["metrics"]
        for name in ("entropy_nats", "oracle_nll", "n_samples", "samples_per_metric.entropy_nats"):
            head, _, tail = name.partition(".")
            value = m[head][tail] if tail else m[name]
            assert ev[f"metrics/{name}"] == [(0, float(np.float32(value)))], name
        assert not any(t.startswith("train/") for t in ev)  # only training stages log curves


@pytest.mark.slow  # runs a tiny study: ~30 s on 2 busy cores
def test_tracking_is_off_by_default_and_enters_no_stage_id(tmp_path):
    plain = plan_study("tracked", load_spec_dict(SPEC)[1])
    assert plain.tracking == {} and "tracking" not in plain.to_dict()
    spec = {**copy.deepcopy(SPEC), "tracking": {"backend": "tensorboard", "dir": str(tmp_path / "tb")}}
    tracked = plan_study("tracked", load_spec_dict(spec)[1])
    assert tracked.tracking == {"backend": "tensorboard", "dir": str(tmp_path / "tb")}
    assert sorted(tracked.stages) == sorted(plain.stages)
    off = {**copy.deepcopy(SPEC), "tracking": {"enabled": False}}
    assert plan_study("tracked", load_spec_dict(off)[1]).tracking == {}
    # a run without the section or --track writes no event file
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["--results", str(tmp_path / "r"), "run", str(tmp_path / "plain.yaml"), "--dry-run"]) == 0
    assert main(["--results", str(tmp_path / "r"), "run", str(tmp_path / "plain.yaml"), "--executor", "debug"]) == 0
    assert not (tmp_path / "r" / "tracked" / "tracking").exists() and not (tmp_path / "tb").exists()


def test_an_unknown_backend_is_a_spec_error_with_did_you_mean():
    with pytest.raises(SpecError, match=r"tracking.*'tensorbord'.*did you mean 'tensorboard'"):
        load_spec_dict({**SPEC, "tracking": {"backend": "tensorbord"}})
    with pytest.raises(SpecError, match=r"unknown key 'tracking\.logdir'.*did you mean 'dir'"):
        load_spec_dict({**SPEC, "tracking": {"logdir": "x"}})


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))


def test_fit_logs_each_steps_loss_and_lr_only_while_a_stage_tracker_is_active(tmp_path):
    """A known loss: L = 3 w0 - 5 w1 on a 2-weight model; every logged step equals FitResult.losses."""
    from fsdfm.tracking import stage_tracking, train_logger
    from fsdfm.train import fit

    cfg = OptimConfig(steps=4, batch_size=2, lr=0.1, warmup_steps=2, ema_decay=None, grad_clip=0.0)
    data = torch.zeros(4, 3, dtype=torch.long)
    settings = {"backend": "tensorboard", "dir": "tb"}
    with stage_tracking(settings, tmp_path, "train_x-abc", "train_x", ["run/1"]) as tracker:
        assert tracker is not None and train_logger() is not None
        res = fit(
            _Scalar(),
            lambda ctx: (ctx.model.w * torch.tensor([3.0, -5.0])).sum(),
            data,
            cfg,
            progress=False,
            device="cpu",
        )
    assert train_logger() is None  # closed with the stage
    ev = _events(tmp_path / "tb" / "train_x-abc")
    assert res.losses[0] == 13.0
    assert ev["train/loss"] == [(i, float(np.float32(x))) for i, x in enumerate(res.losses)]
    assert [v for _, v in ev["train/lr"]] == [float(np.float32(0.1 * lr_factor(i, cfg))) for i in range(4)]
    with stage_tracking({}, tmp_path, "y", "train_x") as off:  # tracking off: no tracker, no folder
        assert off is None and train_logger() is None
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["train_x-abc"]


def test_a_missing_tensorboard_is_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["--results", str(tmp_path / "r"), "run", str(tmp_path / "t.yaml"), "--track"]) == 2
    assert "pip install 'fsdfm[track]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_track_on_a_finished_study_backfills_from_the_records(tmp_path, capsys):
    """Issue 24: `--track` on a finished study logged nothing, silently (every stage is skipped). Now each finished
    stage gets an event folder with its recorded final metrics and loss curve, and the line says what cannot be."""
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(SPEC))
    root = tmp_path / "r"
    assert main(["--results", str(root), "run", str(tmp_path / "t.yaml"), "--executor", "debug"]) == 0
    capsys.readouterr()
    assert main(["--results", str(root), "run", str(tmp_path / "t.yaml"), "--executor", "debug", "--track"]) == 0
    out = capsys.readouterr().out
    recs = {r["stage_id"]: r for r in load_records(root / "tracked")}
    assert f"tracking: backfilled {len(recs)} finished stage(s) from their records" in out
    assert "per-step train/loss, train/lr and train/tokens_per_s are not recorded" in out
    for sid, rec in recs.items():
        ev = _events(root / "tracked" / "tracking" / sid)
        for name, value in (rec["payload"].get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert ev[f"metrics/{name}"][-1][1] == pytest.approx(float(np.float32(value)))
        curve = rec["payload"].get("loss_curve")
        if curve:
            assert [v for _, v in ev["train/loss_curve"]] == pytest.approx([float(np.float32(x)) for x in curve])
    # again: already tracked, nothing written twice
    assert main(["--results", str(root), "run", str(tmp_path / "t.yaml"), "--executor", "debug", "--track"]) == 0
    assert f"tracking: backfilled 0 finished stage(s) from their records, {len(recs)} already tracked" in (
        capsys.readouterr().out
    )


# ------------------------------------------------------------------------------------- hparams and MLflow
def _hparams(folder) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows for an event folder (its session start info)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    out = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                out[k] = getattr(v, v.WhichOneof("kind"))
    return out


CONFIG = {"optim": {"lr": 0.01, "betas": (0.9, 0.98), "ema_decay": None}, "rule": "euler", "steps": 8, "float64": True}
EXPECTED = {
    "kind": "sample",
    "optim.lr": 0.01,
    "optim.betas": "[0.9, 0.98]",
    "optim.ema_decay": "none",
    "rule": "euler",
    "steps": 8,
    "float64": True,
    "run.method": "dfm",
    "run.seed": 3,
}


def test_a_stage_logs_its_config_and_run_as_tensorboard_hparams(tmp_path):
    from fsdfm.tracking import log_final, stage_tracking

    settings = {"backend": "tensorboard", "dir": str(tmp_path / "tb")}
    with stage_tracking(
        settings, tmp_path, "sample-1", "sample", ["r1"], config=CONFIG, run_params={"method": "dfm", "seed": 3}
    ) as tracker:
        log_final(tracker, {"metrics": {"nfe": 8.0}}, step=0)
    hp = _hparams(tmp_path / "tb" / "sample-1")
    # the proto stores every number as a double
    assert hp == {k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in EXPECTED.items()}
    assert _events(tmp_path / "tb" / "sample-1")["metrics/nfe"] == [(0, 8.0)]


def _mlflow_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    return client, {
        r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
    }


def test_the_mlflow_backend_logs_scalars_params_and_texts_to_a_file_store(tmp_path, monkeypatch):
    from fsdfm.tracking import log_final, stage_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = {"backend": "mlflow", "dir": str(tmp_path / "ml")}
    with stage_tracking(
        settings,
        tmp_path / "study",
        "sample-1",
        "sample",
        ["r1"],
        config=CONFIG,
        run_params={"method": "dfm", "seed": 3},
    ) as tracker:
        tracker.scalar("train/loss", 2.5, 0)
        tracker.scalar("train/loss", 1.5, 1)
        log_final(tracker, {"metrics": {"nfe": 8.0, "per": {"x": 1}}}, step=2)
    client, runs = _mlflow_runs(tmp_path / "ml" / "mlruns")
    run = runs["sample-1"]
    assert client.get_experiment(run.info.experiment_id).name == "study" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in EXPECTED.items()}
    assert run.data.metrics == {"train/loss": 1.5, "metrics/nfe": 8.0, "metrics/per.x": 1.0}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(0, 2.5), (1, 1.5)]
    assert (
        "sample sample-1"
        in (tmp_path / "ml" / "mlruns")
        .joinpath(run.info.experiment_id, run.info.run_id, "artifacts", "stage.txt")
        .read_text()
    )


@pytest.mark.slow  # runs a tiny study: ~30 s on 2 busy cores
def test_a_study_tracked_with_mlflow_has_one_run_per_stage_with_the_records_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = {**copy.deepcopy(SPEC), "tracking": {"backend": "mlflow"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["--results", str(tmp_path / "r"), "run", str(tmp_path / "s.yaml"), "--executor", "inline"]) == 0
    client, runs = _mlflow_runs(tmp_path / "r" / "tracked" / "tracking" / "mlruns")
    records = load_records(tmp_path / "r" / "tracked")
    assert set(runs) == {rec["stage_id"] for rec in records}
    for rec in records:
        run = runs[rec["stage_id"]]
        assert run.data.params["kind"] == rec["kind"]
        for name, value in rec["payload"].get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert run.data.metrics[f"metrics/{name}"] == pytest.approx(float(value)), name
    (train,) = load_records(tmp_path / "r" / "tracked", kind="train_dfm")
    losses = client.get_metric_history(runs[train["stage_id"]].info.run_id, "train/loss")
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(train["payload"]["loss_curve"])
