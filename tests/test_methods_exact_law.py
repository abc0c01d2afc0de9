"""Stage exact_law (fsdfm.methods.exact_law): planned only where asked and applicable, without moving any other
stage's id; on the exact denoiser its divergences equal brute-force values computed here from the source alone."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.data import DataConfig, oracle_source
from fsdfm.methods import plan_study
from fsdfm.methods.exact_law import LAW_KIND, exact_law_stage
from fsdfm.methods.exact_teacher import write_exact
from fsdfm.methods.load import load_spec
from fsdfm.report.summary import load_study

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
  hot: {base: dfm, label: hot, knobs: {temperature: 1.5}}
  conf: {base: ex, label: confidence order, rules: [confidence]}
"""
LAW = "  exact_law: {max_steps: 16}\n"


def _plan(tmp_path, metrics_extra: str = "", text: str = ORACLE):
    p = tmp_path / "spec.yaml"
    p.write_text(text + "metrics:\n  names: [oracle_nll]\n" + metrics_extra)
    spec, cells = load_spec(p)
    return plan_study(spec.name, cells)


def test_planned_per_rule_and_budget_up_to_max_steps_and_no_other_id_moves(tmp_path):
    plan = _plan(tmp_path, LAW)
    law_runs = sorted(
        (r.params["method"], r.params["rule"], r.params["steps"]) for r in plan.runs if r.params["kind"] == LAW_KIND
    )
    # the exact denoiser (2 rules x budgets <= 16), the DiT kinds' rule; none for the knob variant "hot" nor for a
    # whole-step sampler ("conf": confidence order is no product kernel)
    assert law_runs == sorted(
        [("ex", r, k) for r in ("cumulative_scalar", "euler") for k in (1, 4)]
        + [("dfm", "cumulative_scalar", 2), ("dfm", "cumulative_scalar", 8), ("fs", "cumulative_scalar", 2)]
    )
    without = _plan(tmp_path)
    assert not [s for s in without.stages.values() if s.kind == "exact_law"]
    others = {i for i, s in plan.stages.items() if s.kind != "exact_law"}
    assert others == set(without.stages)  # asking for the law moves no sample, evaluate or training stage


def test_refused_on_text_data_and_on_too_many_states(tmp_path):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("a b c d e f g h\n" * 50)
    data = f"data: {{kind: text, train: {tmp_path}/train.txt, valid: {tmp_path}/valid.txt, tokenizer: bpe, vocab_size: 300, seq_len: 4}}\n"
    text = "name: t\n" + data + ORACLE.split("model:", 1)[1].split("methods:")[0].join(["model:", ""])
    with pytest.raises(ValueError, match="exact_law: needs an oracle source"):
        _plan(tmp_path, LAW, text + "methods:\n  dfm: {kind: dfm, budgets: [2]}\n")
    with pytest.raises(ValueError, match=r"method 'ex' has 256 states .* over max_states 100"):
        _plan(tmp_path, "  exact_law: {max_states: 100}\n")  # (3 + 1)^4 = 256 under the mask source
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        _plan(tmp_path, "  exact_law: {max_steps: 0}\n")
    with pytest.raises(ValueError, match="split_states must be >= 2"):
        _plan(tmp_path, "  exact_law: {split_states: 1}\n")
    bf16 = ORACLE.replace("seed: 3}", "seed: 3, forward_precision: bfloat16}")
    with pytest.raises(ValueError, match="the law is of the float32 forward pass"):
        _plan(tmp_path, LAW, bf16)


def _brute_force(source, L: int):
    """The source law p over V^L by enumeration, and its product of position marginals prod_i p_i."""
    V = source.vocab_size
    x = np.array(list(itertools.product(range(V), repeat=L)))
    p = np.exp(np.asarray(source.log_prob(x), dtype=np.float64))
    marg = [np.array([p[x[:, i] == v].sum() for v in range(V)]) for i in range(L)]
    prod = np.prod([marg[i][x[:, i]] for i in range(L)], axis=0)
    return p, prod


def _stage(tmp_path, data: dict, rule: str, steps: int, source: str = "mask") -> dict:
    model = tmp_path / f"exact-{source}"
    model.mkdir(exist_ok=True)
    write_exact(model, {"source": source, "scheduler": {"name": "polynomial", "n": 1.0}})
    cfg = {"data": data, "sampler": "exact", "rule": rule, "steps": steps, "t_end": 1.0}
    cfg |= {"split_max_steps": 8, "split_states": 16}
    return exact_law_stage(cfg, {"model": str(model)}, tmp_path)


@pytest.fixture
def data() -> dict:
    oracle = {"source": "markov", "vocab_size": 3, "order": 1, "support": 2, "epsilon": 0.05, "seed": 1}
    return {"kind": "oracle", "seq_len": 4, "oracle": oracle | {"n_train": 200, "n_valid": 40}}


def test_one_step_of_the_exact_denoiser_is_the_product_of_marginals(tmp_path, data):
    """One step reveals every position independently from the exact marginals: q = prod_i p_i, so KL(p || q) is
    the source's total correlation and the split is all factorization (brute force over V^L here)."""
    L = data["seq_len"]
    p, prod = _brute_force(oracle_source(DataConfig(**data)), L)
    out = _stage(tmp_path, data, "cumulative_scalar", 1)
    m = out["metrics"]
    assert m["law_kl_pq"] == pytest.approx(float((p * np.log(p / prod)).sum()) / L, abs=1e-9)
    assert m["law_kl_qp"] == pytest.approx(float((prod * np.log(prod / p)).sum()) / L, abs=1e-9)
    h_p, h_q = -(p * np.log(p)).sum() / L, -(prod * np.log(prod)).sum() / L
    assert m["law_entropy_gap"] == pytest.approx(h_q - h_p, abs=1e-9)
    assert m["law_ce_excess"] == pytest.approx(m["law_kl_qp"] + m["law_entropy_gap"], abs=1e-12)
    # one step from the all-mask state: the one x_t is certain, so the MC split is exact and equals KL(p || q)
    assert m["split_path_kl"] == pytest.approx(m["law_kl_pq"], abs=1e-9)
    assert m["split_factorization"] == pytest.approx(m["law_kl_pq"], abs=1e-9)
    assert abs(m["split_per_position"]) < 1e-9
    assert out["split"]["split_path_kl_se"] == 0.0  # every row starts from the one all-mask state


def test_cumulative_scalar_on_the_exact_denoiser_has_no_per_position_error(tmp_path, data):
    """Under the mask source the cumulative-scalar step of the exact denoiser reproduces the bridge's marginals:
    the per-position term is 0 and the trajectory KL is all factorization; euler's step does not."""
    cs = _stage(tmp_path, data, "cumulative_scalar", 4)["metrics"]
    assert abs(cs["split_per_position"]) < 1e-9
    assert cs["split_path_kl"] == pytest.approx(cs["split_factorization"], abs=1e-9)
    assert cs["split_path_kl"] >= cs["law_kl_pq"] - 3 * 0.05  # data processing, up to the split's MC error
    eu = _stage(tmp_path, data, "euler", 4)["metrics"]
    assert eu["split_per_position"] > 1e-4
    # more steps, less error (the exact denoiser's error is the grid's)
    assert _stage(tmp_path, data, "cumulative_scalar", 64)["metrics"]["law_kl_qp"] < cs["law_kl_qp"] / 4


def test_the_split_is_skipped_above_split_max_steps_and_said(tmp_path, data):
    out = _stage(tmp_path, data, "cumulative_scalar", 16)
    assert "split_path_kl" not in out["metrics"]
    assert out["split"] == "not computed: 16 steps > split_max_steps 8"
    assert math.isfinite(out["metrics"]["law_kl_qp"]) and out["law_mass"] == pytest.approx(1.0)


def test_a_study_records_the_laws_and_the_report_shows_them_beside_the_sampled_ce_excess(tmp_path):
    """End to end (debug executor): the exact_law runs reach table_exact_law with the records' values, the sampled
    CE excess beside them is the per-sample table's mean minus H_L, and no law run is a row of the main table."""
    import pandas as pd

    from fsdfm.launch import execute
    from fsdfm.report import write_report

    spec_file = tmp_path / "spec.yaml"
    methods = ORACLE.split("methods:")[0] + (
        "methods:\n  ex: {kind: exact, label: exact, rules: [cumulative_scalar], budgets: [1, 4]}\n"
        "  dfm: {kind: dfm, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1}, "
        "budgets: [2]}\n"
    )
    spec_file.write_text(methods + "metrics:\n  names: [oracle_nll, entropy_nats]\n" + LAW)
    spec, cells = load_spec(spec_file)
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp_path / "results", executor="debug")
    assert summary.ok, summary.format()
    study_dir = tmp_path / "results" / spec.name
    write_report(study_dir)
    law = pd.read_csv(study_dir / "report" / "table_exact_law.csv")
    assert sorted(zip(law["label"], law["steps"])) == [("dfm", 2), ("exact", 1), ("exact", 4)]
    ex1 = law[(law["label"] == "exact") & (law["steps"] == 1)].iloc[0]
    direct = _stage(tmp_path, dataclasses.asdict(cells[0].spec.data), "cumulative_scalar", 1)["metrics"]
    assert ex1["law_kl_qp"] == pytest.approx(direct["law_kl_qp"], abs=1e-12)
    # the sampled CE excess: the matching sample run's per-sample oracle_nll, mean minus H_L
    study = load_study(study_dir)
    run = study.models[(study.models["method"] == "ex") & (study.models["steps"] == 1)].iloc[0]
    nll = study.samples.loc[study.samples["run_id"] == run["run_id"], "oracle_nll"].astype(float)
    assert len(nll) == 16 and (law["n_samples"] == 16).all()
    assert ex1["ce_sampled"] == pytest.approx(nll.mean() - run["oracle_expected_nll"], abs=1e-9)
    main = pd.read_csv(study_dir / "report" / "table_main.csv")
    assert len(main) == 1 + 3  # the data row and the three sampled settings: no law row
    index = (study_dir / "report" / "index.md").read_text()
    assert "## True divergences of each sampler's output law (exact)" in index
    assert "settings (method × rule × steps, incl. data): 4; seeds per setting: 1" in index  # not 2: no law runs


def test_the_sampled_ce_excess_beside_a_law_is_its_own_models_not_a_pool_of_variants(tmp_path):
    """Two variants of one method (a grid over model.hidden: same method, rule and steps, two labels) each get the
    sampled CE excess of their own models' samples."""
    import pandas as pd

    from fsdfm.launch import execute
    from fsdfm.report import write_report

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        ORACLE.split("methods:")[0]
        + "methods:\n  dfm: {kind: dfm, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1},"
        + " budgets: [2]}\nmetrics:\n  names: [oracle_nll]\n"
        + LAW
        + "grid:\n  model.hidden: [16, 32]\n"
    )
    spec, cells = load_spec(spec_file)
    assert execute(plan_study(spec.name, cells), tmp_path / "results", executor="debug").ok
    study_dir = tmp_path / "results" / spec.name
    write_report(study_dir)
    law = pd.read_csv(study_dir / "report" / "table_exact_law.csv")
    study = load_study(study_dir)
    models = study.models[study.models["kind"] == "dfm"]
    assert len(law) == 2 and len(models) == 2 and set(law["label"]) == set(models["label"])
    for _, run in models.iterrows():
        nll = study.samples.loc[study.samples["run_id"] == run["run_id"], "oracle_nll"].astype(float)
        row = law[law["label"] == run["label"]].iloc[0]
        assert row["n_samples"] == 16  # one model's samples, not both variants' 32
        assert row["ce_sampled"] == pytest.approx(nll.mean() - run["oracle_expected_nll"], abs=1e-9)


def test_a_student_of_a_uniform_teacher_counts_the_states_of_its_teachers_path(tmp_path):
    # a FS-DFM student keeps `source: mask` in its own spec but samples its uniform teacher's path: 3^4 = 81
    # states, not the mask path's (3 + 1)^4 = 256, so max_states 100 admits it (was refused)
    uniform = ORACLE.split("methods:")[0] + (
        "methods:\n"
        "  uni: {kind: dfm, source: uniform, train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [2]}\n"
        "  fsu: {kind: fsdfm, teacher: uni, distill: {K: 2}, train: {steps: 2, batch_size: 8, warmup_steps: 1},"
        " budgets: [2]}\n"
    )
    plan = _plan(tmp_path, "  exact_law: {max_states: 100}\n", uniform)
    assert sorted(r.params["method"] for r in plan.runs if r.params["kind"] == LAW_KIND) == ["fsu", "uni"]
    masked = uniform.replace("source: uniform, ", "")
    with pytest.raises(ValueError, match=r"method 'uni' has 256 states"):
        _plan(tmp_path, "  exact_law: {max_states: 100}\n", masked)
