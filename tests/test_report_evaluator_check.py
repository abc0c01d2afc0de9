"""The evaluator check (fsdfm.report.evaluator_check): Spearman's rho against scipy, the bootstrap interval, and the
three populations of a study (exact and sanity rows found from the plan and the runs)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsdfm.report.evaluator_check import (
    MIN_N,
    evaluator_agreement_table,
    evaluator_check_frame,
    evaluator_check_table,
    rank_agreement,
    spearman,
)
from fsdfm.report.summary import Study


def test_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=40).astype(float)  # many ties
    y = x + rng.normal(0, 2.0, size=40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_monotone_maps_give_plus_and_minus_one_and_constants_nan():
    x = np.linspace(0.1, 3.0, 12)
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert spearman(x, -np.log(x)) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones_like(x)))


def test_bootstrap_interval_brackets_rho_is_reproducible_and_absent_below_min_n():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = x + rng.normal(0, 1.0, size=30)
    a, b = rank_agreement(x, y, n_boot=500, seed=7), rank_agreement(x, y, n_boot=500, seed=7)
    assert a == b and a.n == 30
    assert a.lo < a.rho < a.hi and -1 <= a.lo and a.hi <= 1
    small = rank_agreement(x[: MIN_N - 1], y[: MIN_N - 1])
    assert small.n == MIN_N - 1 and math.isnan(small.lo) and math.isnan(small.hi)
    nan_pairs = rank_agreement(np.r_[x, np.nan], np.r_[y, 1.0])  # a pair with a NaN is dropped, not ranked
    assert nan_pairs.n == 30 and nan_pairs.rho == pytest.approx(a.rho)


def _study(tmp_path) -> Study:
    """Three trained settings x 2 seeds whose gen_ppl is exp(oracle_nll) (the evaluator is right), an exact row,
    and a sanity row with the lowest gen_ppl and the worst oracle_nll (a repeater fooling perplexity)."""
    stages, rows = {}, []

    def add(label, kind, seed, nll, ppl, model_kind="train_dfm", sanity=False):
        i = len(rows)
        ev, smp, mdl = f"evaluate-{i}", f"sample-{i}", f"model-{i}"
        stages[ev] = {"kind": "evaluate", "inputs": {"samples": smp}, "config": {}}
        stages[smp] = {"kind": "sample", "inputs": {"model": mdl}, "config": {}}
        stages[mdl] = {"kind": model_kind, "inputs": {}, "config": {}}
        rows.append(dict(stage_id=ev, kind=kind, label=label, rule="r", steps=8, seed=seed, sanity=sanity,
                         oracle_nll=nll, gen_ppl=ppl))  # fmt: skip

    for label, nll in (("A", 1.0), ("B", 2.0), ("C", 3.0)):
        for seed in (0, 1):
            add(label, "dfm", seed, nll + 0.1 * seed, math.exp(nll + 0.1 * seed))
    add("exact", "exact", 0, 0.5, math.exp(0.5), model_kind="exact_posterior")
    add("naive: repeat_top", "naive", 0, 9.0, 1.01, sanity=True)
    runs = pd.DataFrame(rows)
    return Study(name="s", path=tmp_path, plan={"stages": stages}, runs=runs, description="", grid_keys=(),
                 seed_keys=(), ablation_keys=(), n_planned=len(rows))  # fmt: skip


def test_a_study_gives_three_populations_with_known_answers(tmp_path):
    study = _study(tmp_path)
    frame = evaluator_check_frame(study).set_index("population")
    trained = frame.loc["trained models (no exact, no sanity rows)"]
    assert trained["n"] == 6 and trained["spearman_rho"] == pytest.approx(1.0)  # the exact and naive rows left out
    every = frame.loc["every model run"]
    runs = study.runs
    expected = stats.spearmanr(np.log(runs["gen_ppl"]), runs["oracle_nll"]).statistic
    assert every["n"] == 8 and every["spearman_rho"] == pytest.approx(expected) and expected < 1.0
    means = frame.loc["setting means (over seeds)"]
    assert means["n"] == 5  # A, B, C, exact, naive
    table = evaluator_check_table(study)
    assert table.name == "table_evaluator_check" and len(table.cells) == 3
    assert "1.000 [" in table.cells[1][2]  # an interval is shown at n = 6
    assert "[" in table.cells[2][2]  # n = 5 = MIN_N: an interval


def test_a_study_without_both_scores_gives_an_empty_table(tmp_path):
    study = _study(tmp_path)
    study = Study(**{**study.__dict__, "runs": study.runs.drop(columns=["gen_ppl"])})
    assert evaluator_check_frame(study).empty and evaluator_check_table(study).empty


def test_the_second_evaluators_agreement_is_rho_of_the_two_log_perplexities(tmp_path):
    study = _study(tmp_path)
    runs = study.runs.copy()
    # the second evaluator agrees on A < B < C but swaps the order of the two seeds of C, and rates the repeater
    # as the data says (worst): a known, non-trivial rank correlation over every model run
    second = np.exp(runs["oracle_nll"].to_numpy())
    second[[4, 5]] = second[[5, 4]]
    runs["gen_ppl_second"] = second
    study = Study(**{**study.__dict__, "runs": runs})
    frame = evaluator_check_frame(study, "gen_ppl_second").set_index("population")
    expected = stats.spearmanr(np.log(runs["gen_ppl"]), np.log(runs["gen_ppl_second"])).statistic
    assert frame.loc["every model run", "spearman_rho"] == pytest.approx(expected) and expected < 0.9
    trained = stats.spearmanr(runs["gen_ppl"][:6], second[:6]).statistic
    assert frame.loc["trained models (no exact, no sanity rows)", "spearman_rho"] == pytest.approx(trained)
    table = evaluator_agreement_table(study)
    assert table.name == "table_evaluator_agreement" and "gen_ppl_second" in table.columns[2]
    assert evaluator_agreement_table(
        Study(**{**study.__dict__, "runs": study.runs.drop(columns=["gen_ppl_second"])})
    ).empty


def test_the_agreement_is_computed_on_a_text_study_without_oracle_nll(tmp_path):
    """claims_v2 (TinyStories) has gen_ppl_second on every run but no oracle_nll: the agreement table was empty
    there, because the runs were read through the oracle annotation. The data row is not a model run."""
    study = _study(tmp_path)
    runs = study.runs.drop(columns=["oracle_nll"]).iloc[:6].copy()  # the six trained runs, text-study style
    second = runs["gen_ppl"].to_numpy() ** 2
    second[[4, 5]] = second[[5, 4]]  # the second evaluator swaps C's two seeds
    runs["gen_ppl_second"] = second
    data = dict(stage_id="evaluate_data-0", kind="data", label="data (held-out)", rule=None, steps=None, seed=None,
                sanity=False, gen_ppl=1e9, gen_ppl_second=1e-9)  # fmt: skip
    runs = pd.concat([runs, pd.DataFrame([data])], ignore_index=True)
    study = Study(**{**study.__dict__, "runs": runs})
    frame = evaluator_check_frame(study, "gen_ppl_second").set_index("population")
    expected = stats.spearmanr(runs["gen_ppl"][:6], second).statistic
    assert frame.loc["every model run", "n"] == 6 and expected < 1.0
    assert frame.loc["every model run", "spearman_rho"] == pytest.approx(expected)
    assert len(evaluator_agreement_table(study).cells) == 3
