"""Stage path_split (fsdfm.methods.path_split): planned only where asked and applicable, without moving any other
stage's id; on the exact denoiser its split equals values computed here by enumerating the source; a study's runs
reach table_path_split and no other table."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.methods import plan_study
from fsdfm.methods.exact_teacher import write_exact
from fsdfm.methods.load import load_spec
from fsdfm.methods.path_split import SPLIT_KIND, path_split_stage
import fsdfm.data
from fsdfm.data import oracle_source

ORACLE = """
name: t
data:
  kind: oracle
  seq_len: 4
  oracle: {source: markov, vocab_size: 3, order: 1, support: 2, epsilon: 0.05, seed: 1, n_train: 200, n_valid: 40}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 16, batch_size: 16, seed: 3}
evaluator: {kind: none}
methods:
  ex: {kind: exact, rules: [cumulative_scalar, euler], budgets: [1, 4, 64]}
  dfm: {kind: dfm, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [2, 8]}
  fs: {kind: fsdfm, teacher: dfm, distill: {K: 2}, train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [2]}
  uni: {kind: dfm, source: uniform, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [2]}
  fsu: {base: fs, teacher: uni}
  hot: {base: dfm, label: hot, knobs: {temperature: 1.5}}
  conf: {base: ex, label: confidence order, rules: [confidence]}
"""
SPLIT = "  path_split: {max_steps: 4, states: 8, draws: 2}\n"


def _plan(tmp_path, metrics_extra: str = "", text: str = ORACLE):
    p = tmp_path / "spec.yaml"
    p.write_text(text + "metrics:\n  names: [oracle_nll]\n" + metrics_extra)
    spec, cells = load_spec(p)
    return plan_study(spec.name, cells)


def test_planned_per_rule_and_budget_up_to_max_steps_and_no_other_id_moves(tmp_path):
    plan = _plan(tmp_path, SPLIT)
    runs = sorted(
        (r.params["method"], r.params["rule"], r.params["steps"]) for r in plan.runs if r.params["kind"] == SPLIT_KIND
    )
    # mask-source product-kernel samplers only: none for the uniform source ("uni", nor "fsu", a student whose own
    # `source` field says mask but who samples its uniform teacher's path), the knob variant ("hot") or a whole-step
    # sampler ("conf"), none above max_steps
    assert runs == sorted(
        [("ex", r, k) for r in ("cumulative_scalar", "euler") for k in (1, 4)]
        + [("dfm", "cumulative_scalar", 2), ("fs", "cumulative_scalar", 2)]
    )
    only4 = _plan(tmp_path, "  path_split: {max_steps: 4, budgets: [4]}\n")
    only4_runs = sorted(
        (r.params["method"], r.params["rule"], r.params["steps"]) for r in only4.runs if r.params["kind"] == SPLIT_KIND
    )
    assert only4_runs == [("ex", "cumulative_scalar", 4), ("ex", "euler", 4)]  # budgets: [4] keeps the 4-step runs
    without = _plan(tmp_path)
    others = {i for i, s in plan.stages.items() if s.kind != "path_split"}
    assert others == set(without.stages)  # asking for the split moves no sample, evaluate or training stage


def test_refused_on_text_data_and_on_bad_settings(tmp_path):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("a b c d e f g h\n" * 50)
    data = f"data: {{kind: text, train: {tmp_path}/train.txt, valid: {tmp_path}/valid.txt, tokenizer: bpe, vocab_size: 300, seq_len: 4}}\n"
    text = "name: t\n" + data + ORACLE.split("model:", 1)[1].split("methods:")[0].join(["model:", ""])
    with pytest.raises(ValueError, match="path_split: needs an oracle source"):
        _plan(tmp_path, SPLIT, text + "methods:\n  dfm: {kind: dfm, budgets: [2]}\n")
    with pytest.raises(ValueError, match="draws must be >= 2"):
        _plan(tmp_path, "  path_split: {draws: 1}\n")
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        _plan(tmp_path, "  path_split: {max_steps: 0}\n")
    with pytest.raises(ValueError, match=r"budgets are integers in 1..max_steps \(16\), got 32"):
        _plan(tmp_path, "  path_split: {budgets: [8, 32]}\n")


@pytest.fixture
def data() -> dict:
    oracle = {"source": "markov", "vocab_size": 3, "order": 1, "support": 2, "epsilon": 0.05, "seed": 1}
    return {"kind": "oracle", "seq_len": 4, "oracle": oracle | {"n_train": 200, "n_valid": 40}}


def _stage(tmp_path, data: dict, rule: str, steps: int, states: int = 64, draws: int = 8) -> dict:
    model = tmp_path / "exact-mask"
    model.mkdir(exist_ok=True)
    write_exact(model, {"source": "mask", "scheduler": {"name": "polynomial", "n": 1.0}})
    cfg = {"data": data, "sampler": "exact", "rule": rule, "steps": steps, "states": states, "draws": draws}
    return path_split_stage(cfg, {"model": str(model)}, tmp_path)


def test_one_step_of_the_exact_denoiser_splits_into_the_sources_total_correlation(tmp_path, data):
    """One step from the all-mask state draws every position from its exact marginal: the per-position term is 0
    and the factorization is the source's own total correlation, (sum_i H(p_i) - H(p)) / L, enumerated here."""
    src, L = oracle_source(fsdfm.data.DataConfig(**data)), 4
    x = np.array(list(itertools.product(range(3), repeat=L)))
    p = np.exp(np.asarray(src.log_prob(x), dtype=np.float64))
    marg = [np.array([p[x[:, i] == v].sum() for v in range(3)]) for i in range(L)]
    tc = (sum(-(m * np.log(m)).sum() for m in marg) + (p * np.log(p)).sum()) / L
    out = _stage(tmp_path, data, "cumulative_scalar", 1, states=256, draws=8)
    m = out["metrics"]
    assert abs(m["traj_per_position"]) < 1e-10
    assert m["traj_kl"] == pytest.approx(m["traj_factorization"] + m["traj_per_position"], abs=1e-12)
    assert abs(m["traj_factorization"] - tc) <= 4 * out["traj_factorization_se"] + 1e-12, (m, tc)
    assert tc > 1e-3  # the chain's positions are dependent: a product sampler cannot be exact in one step


def test_more_steps_shrink_the_factorization_and_euler_adds_a_per_position_error(tmp_path, data):
    one = _stage(tmp_path, data, "cumulative_scalar", 1)["metrics"]
    four = _stage(tmp_path, data, "cumulative_scalar", 4)["metrics"]
    euler = _stage(tmp_path, data, "euler", 4)
    assert four["traj_factorization"] < one["traj_factorization"]
    assert abs(four["traj_per_position"]) < 1e-10  # cumulative scalar reproduces the exact step's marginals
    assert euler["metrics"]["traj_per_position"] > 1e-4  # Euler's jump probability is not the bridge's
    assert len(euler["per_step"]) == 4 and all(s["tc"] >= -1e-12 for s in euler["per_step"])


def test_a_study_records_the_split_and_the_report_shows_it_and_nothing_else(tmp_path):
    import pandas as pd

    from fsdfm.launch import execute
    from fsdfm.report import write_report

    spec_file = tmp_path / "spec.yaml"
    methods = ORACLE.split("methods:")[0] + (
        "methods:\n  ex: {kind: exact, label: exact, rules: [cumulative_scalar], budgets: [1, 4]}\n"
        "  dfm: {kind: dfm, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1}, "
        "budgets: [2]}\n"
    )
    spec_file.write_text(methods + "metrics:\n  names: [oracle_nll, entropy_nats]\n" + SPLIT)
    spec, cells = load_spec(spec_file)
    summary = execute(plan_study(spec.name, cells), tmp_path / "results", executor="debug")
    assert summary.ok, summary.format()
    study_dir = tmp_path / "results" / spec.name
    write_report(study_dir)
    table = pd.read_csv(study_dir / "report" / "table_path_split.csv")
    assert sorted(zip(table["label"], table["steps"])) == [("dfm", 2), ("exact", 1), ("exact", 4)]
    ex4 = table[(table["label"] == "exact") & (table["steps"] == 4)].iloc[0]
    direct = _stage(tmp_path, dataclasses.asdict(cells[0].spec.data), "cumulative_scalar", 4, states=8, draws=2)
    assert ex4["traj_kl"] == pytest.approx(direct["metrics"]["traj_kl"], abs=1e-12)  # the same seeds, the same value
    assert math.isfinite(ex4["ce_sampled"]) and ex4["n_samples"] == 16
    main = pd.read_csv(study_dir / "report" / "table_main.csv")
    assert len(main) == 1 + 3  # the data row and the three sampled settings: no split row
    index = (study_dir / "report" / "index.md").read_text()
    assert "## Trajectory KL along the true path: factorization vs per-position" in index
    assert "settings (method × rule × steps, incl. data): 4; seeds per setting: 1" in index


def test_a_split_without_evaluated_samples_yet_has_no_sampled_ce_excess_and_no_error():
    """A study still running: its split runs are in, no sample run is evaluated yet (`_sample_runs` is empty and has
    no `model` column). The table's CE-excess column is empty; before the fix this raised KeyError: 'model'."""
    import pandas as pd

    from fsdfm.report.exact_law import _sampled_ce_excess

    ce, hw, n = _sampled_ce_excess(pd.DataFrame(), {"train_dfm-x"}, "cumulative_scalar", 8, {})
    assert math.isnan(ce) and math.isnan(hw) and n == 0
