"""The oracle report's verdict sentences: student vs teacher decided by a paired test, not by eye."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

import pandas as pd
from scipy import stats

from fsdfm.report.oracle import _versus_teacher


def _runs(student: list[float], teacher: list[float], teacher_steps: int = 8) -> pd.DataFrame:
    rows = [
        {"run_id": f"s{i}", "label": "S", "rule": "cumulative_scalar", "steps": 8, "seed": i, "oracle_nll": v}
        for i, v in enumerate(student)
    ]
    rows += [
        {
            "run_id": f"t{i}",
            "label": "T",
            "rule": "cumulative_scalar",
            "steps": teacher_steps,
            "seed": i,
            "oracle_nll": v,
        }
        for i, v in enumerate(teacher)
    ]
    return pd.DataFrame(rows)


def _verdict(runs: pd.DataFrame, teacher_steps: int | None = None) -> str:
    study = SimpleNamespace(seed_keys=("seed",), samples=None)
    st = pd.Series({"label": "S", "rule": "cumulative_scalar"})
    return _versus_teacher(study, runs, st, "T", 8, teacher_steps)


def test_a_consistent_paired_difference_is_a_verdict_with_the_paired_t_p_value():
    student, teacher = [3.064, 2.931, 2.792], [2.893, 2.812, 2.673]
    line = _verdict(_runs(student, teacher))
    p = stats.ttest_rel(student, teacher).pvalue  # independent computation of the same test
    assert line.startswith("S is worse than its teacher T at 8 steps")
    assert f"p = {p:.2g}" in line and "paired t across seeds, n = 3" in line


def test_a_difference_inside_the_seed_noise_is_not_a_verdict():
    # the student is lower on average, but one seed goes the other way: p >= 0.05
    student, teacher = [2.60, 2.90, 2.30], [2.91, 2.68, 2.63]
    assert stats.ttest_rel(student, teacher).pvalue >= 0.05
    assert "is not distinguishable from its teacher T" in _verdict(_runs(student, teacher))


def test_the_claim_line_compares_with_the_teachers_largest_budget():
    line = _verdict(_runs([2.52, 2.73, 2.30], [1.87, 2.00, 1.72], teacher_steps=1024), teacher_steps=1024)
    assert "at 8 steps vs its teacher at 1024" in line and "is worse than" in line


def test_a_teacher_sampled_under_an_alias_of_the_students_rule_is_its_teacher():
    # samplers.yaml: the teacher samples with "mdlm", an alias of the student's "cumulative_scalar"
    student, teacher = [3.064, 2.931, 2.792], [2.893, 2.812, 2.673]
    runs = _runs(student, teacher)
    runs.loc[runs["label"] == "T", "rule"] = "mdlm"
    line = _verdict(runs)
    assert line is not None and line.startswith("S is worse than its teacher T at 8 steps")
    assert f"p = {stats.ttest_rel(student, teacher).pvalue:.2g}" in line


def test_no_shared_seed_and_no_samples_gives_no_verdict():
    runs = _runs([2.5], [2.7])
    assert _verdict(runs) is None


def test_monte_carlo_standard_errors_from_the_per_sample_table():
    from fsdfm.report.mc import mc_standard_errors, pooled_se

    rng = np.random.default_rng(0)
    a, b = rng.normal(2.0, 0.5, 100), rng.normal(3.0, 1.0, 400)
    samples = pd.DataFrame(
        {"run_id": ["a"] * 100 + ["b"] * 400, "oracle_nll": np.r_[a, b], "entropy_nats": np.r_[a, b] + 1}
    )
    se = mc_standard_errors(SimpleNamespace(samples=samples)).set_index("run_id")
    want_a, want_b = a.std(ddof=1) / 10, b.std(ddof=1) / 20
    assert se.loc["a", "oracle_nll"] == pytest.approx(want_a) and se.loc["b", "entropy_nats"] == pytest.approx(want_b)
    # the mean of the two run means: Var = (SE_a^2 + SE_b^2) / 4
    assert pooled_se(se.reset_index(), ["a", "b"], "oracle_nll") == pytest.approx(math.hypot(want_a, want_b) / 2)


def test_holm_adjustment_matches_the_step_down_definition():
    from fsdfm.report.significance import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, max(0.04, 3 x 0.02), max(0.06, 2 x 0.03), max(0.06, 0.5)
    got = holm([0.03, 0.5, 0.01, 0.02])
    assert got == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # a NaN is no test: it stays NaN and m = 2
    got = holm([0.04, float("nan"), 0.01])
    assert got[0] == pytest.approx(0.04) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    # a family of one is the test itself; the adjusted p never exceeds 1
    assert holm([0.2]) == [0.2] and holm([0.6, 0.7]) == [1.0, 1.0]
