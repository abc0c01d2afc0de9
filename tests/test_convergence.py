"""Convergence, shown: held-out curves along training (optim.curve_every) and the stopping rule optim.until."""

import pytest
import torch
from torch import nn

from fsdfm.train import OptimConfig, fit


def _toy(tmp_path, cfg: OptimConfig, stop_after=None, ckpt="ckpt"):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)

    def loss_fn(ctx):
        return ((ctx.model(x) - 1.0) ** 2).mean()

    def evaluate(m):  # a deterministic function of the weights being kept
        return {"val": float(((m(x) - 1.0) ** 2).mean()), "w0": float(m.weight[0, 0])}

    data = torch.zeros((8, 2), dtype=torch.long)  # fit draws batches from it; the toy loss ignores them
    return fit(model, loss_fn, data, cfg, tmp_path / ckpt, progress=False, evaluate=evaluate, stop_after=stop_after)


def test_the_curve_has_a_point_every_n_steps_and_at_the_end(tmp_path):
    res = _toy(tmp_path, OptimConfig(steps=25, batch_size=2, lr=0.05, warmup_steps=1, ema_decay=None, curve_every=10))
    assert [c["step"] for c in res.curve] == [10, 20, 25] and res.stopped_at is None
    assert res.curve[-1]["val"] < res.curve[0]["val"]  # it learns: the held-out loss falls


def test_the_stopping_rule_stops_after_patience_evaluations_without_improvement(tmp_path):
    # min_delta larger than any possible gain: no evaluation ever improves, so training stops at the evaluation
    # patience + 1, i.e. at step (patience + 1) * every
    until = {"metric": "val", "patience": 2, "every": 5, "min_delta": 1e9}
    res = _toy(tmp_path, OptimConfig(steps=100, batch_size=2, lr=0.05, warmup_steps=1, ema_decay=None, until=until))
    assert res.stopped_at == 15 and res.steps == 15 and [c["step"] for c in res.curve] == [5, 10, 15]
    assert len(res.losses) == 15


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path):
    until = {"metric": "val", "patience": 2, "every": 4, "min_delta": 1e9}
    cfg = OptimConfig(steps=50, batch_size=2, lr=0.05, warmup_steps=1, ema_decay=0.9, until=until, ckpt_every=3)
    whole = _toy(tmp_path, cfg, ckpt="a")
    _toy(tmp_path, cfg, stop_after=7, ckpt="b")  # preempted before the rule fired
    resumed = _toy(tmp_path, cfg, ckpt="b")
    assert resumed.stopped_at == whole.stopped_at == 12
    assert resumed.curve == whole.curve  # resumption is exact (the suite's checkpoints restore every state)
    again = _toy(tmp_path, cfg, ckpt="b")  # a stopped run restarted does not train on
    assert again.steps == 12 and again.curve == resumed.curve


def test_absent_settings_leave_the_stage_config_unchanged_and_bad_ones_are_refused():
    assert "until" not in OptimConfig().to_dict() and "curve_every" not in OptimConfig().to_dict()
    d = OptimConfig(until={"metric": "val_nll", "patience": 3, "every": 50}).to_dict()
    assert d["until"] == {"metric": "val_nll", "patience": 3, "every": 50, "min_delta": 0.0}
    with pytest.raises(ValueError, match="unknown key"):
        OptimConfig(until={"metric": "val_nll", "patience": 3, "every": 5, "max_step": 9})
    with pytest.raises(ValueError, match="every must be an integer"):
        OptimConfig(until={"metric": "val_nll", "patience": 3})  # no every and no curve_every


def test_the_report_reads_the_curves_of_the_training_records(tmp_path):
    import sys
    from pathlib import Path

    from fsdfm.io import atomic_write_json, read_json
    from fsdfm.records import stage_dir
    from fsdfm.report import load_study, write_report
    from fsdfm.report.convergence import convergence_frame

    sys.path.insert(0, str(Path(__file__).parent))
    from test_report_speedup import _study

    sdir = _study(tmp_path)
    plan = read_json(sdir / "plan.json")
    train = [sid for sid, st in plan["stages"].items() if st["kind"] == "train"]
    for i, sid in enumerate(train):
        curve = [{"step": s, "val_nll": 3.0 - s / 100 + i} for s in (10, 20, 30)]
        atomic_write_json(
            stage_dir(sdir, sid) / "record.json",
            {"status": "done", "stage_id": sid, "kind": "train", "payload": {"curve": curve, "stopped_at": 30}},
        )
    df = convergence_frame(load_study(sdir))
    assert len(df) == 3 * len(train) and set(df["label"]) == {"DFM"} and set(df["metric"]) == {"val_nll"}
    assert sorted(df[df["stage_id"] == train[1]]["value"]) == pytest.approx([3.7, 3.8, 3.9])
    out = write_report(sdir)
    assert any(p.name == "fig_convergence.png" for p in out.figures)


UNTIL_SPEC = """
name: t
data:
  kind: oracle
  seq_len: 4
  oracle: {source: markov, vocab_size: 3, order: 1, support: 2, epsilon: 0.05, seed: 1, n_train: 200, n_valid: 40}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 16, batch_size: 16, seed: 3}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, source: SOURCE, train: {steps: 4, until: {metric: METRIC, patience: 2, every: 2}}, budgets: [2]}
  fs: {kind: fsdfm, teacher: dfm, distill: {K: 2}, train: {steps: 4, until: {metric: FSMETRIC, patience: 2, every: 2}}, budgets: [2]}
metrics: {names: [oracle_nll]}
"""


@pytest.mark.parametrize(
    "source, metric, fs_metric, refused",
    [
        ("mask", "val_nll", "posterior_kl_h0.25", None),
        ("uniform", "val_ce", "posterior_kl_h1", None),
        ("mask", "posterior_kl", "posterior_kl_h0.5", None),
        # the uniform source has no ELBO: its curve records no val_nll (was a KeyError 250 steps into training)
        ("uniform", "val_nll", "posterior_kl_h1", "methods.dfm.train.until.metric"),
        ("mask", "val_nl", "posterior_kl_h1", "did you mean 'val_nll'"),
        # K = 2: the student's curve has h = 1, 1/2, 1/4 and no plain posterior_kl
        ("mask", "val_nll", "posterior_kl_h0.125", "methods.fs.train.until.metric"),
        ("mask", "val_nll", "posterior_kl", "methods.fs.train.until.metric"),
    ],
)
def test_a_stopping_rule_must_name_a_metric_the_kinds_curve_records(tmp_path, source, metric, fs_metric, refused):
    from fsdfm.methods.load import load_spec
    from fsdfm.study.spec import SpecError

    p = tmp_path / "spec.yaml"
    p.write_text(UNTIL_SPEC.replace("FSMETRIC", fs_metric).replace("SOURCE", source).replace("METRIC", metric))
    if refused is None:
        load_spec(p)
        return
    with pytest.raises(SpecError, match=refused.replace(".", r"\.")):
        load_spec(p)


def _with_curves(tmp_path, value):
    """The speed-up test study (3 teacher stages, seeds 0-2) with a val_nll curve at steps 100..400 on each
    teacher stage: value(i, step) for stage i."""
    import sys
    from pathlib import Path

    from fsdfm.io import atomic_write_json, read_json
    from fsdfm.records import stage_dir

    sys.path.insert(0, str(Path(__file__).parent))
    from test_report_speedup import _study

    sdir = _study(tmp_path)
    plan = read_json(sdir / "plan.json")
    train = [sid for sid, st in plan["stages"].items() if st["kind"] == "train"]
    for i, sid in enumerate(train):
        curve = [{"step": s, "val_nll": value(i, s)} for s in (100, 200, 300, 400)]
        atomic_write_json(
            stage_dir(sdir, sid) / "record.json",
            {"status": "done", "stage_id": sid, "kind": "train", "payload": {"curve": curve}},
        )
    return sdir


def test_the_convergence_table_says_which_curves_were_still_falling(tmp_path):
    from fsdfm.report import load_study, write_report
    from fsdfm.report.convergence import convergence_table

    # falling by 0.1 over the last quarter (steps 300 -> 400) on every seed: still falling
    sdir = _with_curves(tmp_path / "a", lambda i, s: 3.0 - s / 1000 + i)
    row = convergence_table(load_study(sdir)).numbers.iloc[0]
    assert (row["label"], row["metric"], row["n"], row["from_step"], row["steps"]) == ("DFM", "val_nll", 3, 300, 400)
    assert row["last_mean"] == pytest.approx(3.6) and row["delta_mean"] == pytest.approx(-0.1)
    assert row["still_falling"] == "yes"
    assert "table_convergence.md" in {p.name for p in write_report(sdir).tables}
    # a plateau whose last-quarter changes are +0.01, -0.01, 0 over the seeds: mean 0, not still falling
    sdir = _with_curves(tmp_path / "b", lambda i, s: 2.0 + (0.01, -0.01, 0.0)[i] * (s == 400))
    row = convergence_table(load_study(sdir)).numbers.iloc[0]
    assert row["delta_mean"] == pytest.approx(0.0) and row["delta_std"] == pytest.approx(0.01)
    assert row["still_falling"] == "no"


def test_a_curve_too_sparse_for_a_last_quarter_is_measured_over_its_last_interval(tmp_path):
    """scaling.yaml's 300-step teachers record every 250 steps: points at 250 and 300 only, none at or before 225.
    The change is then v(300) - v(250) over the window 250-300 (it was left blank), and a one-point curve has none."""
    import pandas as pd

    from fsdfm.report.convergence import _last_part_change

    sparse = pd.DataFrame({"step": [300, 250], "value": [1.5, 1.75]})  # unsorted on purpose
    assert _last_part_change(sparse) == (300, 250, 1.5, pytest.approx(-0.25))
    # with a point in the first three quarters the window is the last quarter, not the last interval
    dense = pd.DataFrame({"step": [100, 200, 300, 400], "value": [4.0, 3.0, 2.5, 2.25]})
    assert _last_part_change(dense) == (400, 300, 2.25, pytest.approx(-0.25))
    last, start, v, delta = _last_part_change(pd.DataFrame({"step": [300], "value": [1.5]}))
    assert (last, start, v) == (300, 300, 1.5) and delta != delta
