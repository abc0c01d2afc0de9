"""The headline pair across a grid (fsdfm.report.pair_grid): per-cell paired differences and the OLS trend along
log2 axes recover a known construction; the HC3 fit matches an independent least-squares solve."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsdfm.report.pair_grid import cell_differences, fit_trend, pair_grid_table, pair_trend_table
from fsdfm.report.summary import Study, variant_labels

HIDDEN, STEPS, SEQ = (32, 64, 128), (300, 1000, 3000), (32, 64)
KEYS = ("model.hidden", "methods.dfm.train.steps", "data.seq_len")
NOISE = {0: 0.01, 1: -0.01, 2: 0.0}  # zero-mean per cell: OLS on the seeds equals OLS on the exact cell means


def d_true(h: int, n: int, length: int) -> float:
    """The student-teacher gap built into the fake study: shrinks 0.1 per doubling of size, grows 0.05 per
    doubling of training, 0.02 per doubling of length."""
    return 0.5 - 0.1 * math.log2(h / 32) + 0.05 * math.log2(n / 300) + 0.02 * math.log2(length / 32)


def fake_study(extra_runs: list | None = None) -> Study:
    rows = []
    for h in HIDDEN:
        for n in STEPS:
            for length in SEQ:
                for seed in NOISE:
                    teacher = 2.0 + 0.3 * seed + 0.001 * h  # differs by seed and cell: pairing must remove it
                    cell = {"model.hidden": h, "methods.dfm.train.steps": n, "data.seq_len": length, "seed": seed}
                    # entropy (a data-targeted metric, listed before oracle_nll by the registry): a gap of 7 everywhere
                    rows.append({**cell, "method": "dfm", "label": "DFM", "steps": 1024, "oracle_nll": teacher,
                                 "entropy_nats": 1.0})  # fmt: skip
                    student = teacher + d_true(h, n, length) + NOISE[seed]
                    rows.append({**cell, "method": "fsdfm", "label": "FS", "steps": 8, "oracle_nll": student,
                                 "entropy_nats": 8.0})  # fmt: skip
    runs = pd.DataFrame(rows + (extra_runs or []))
    runs["rule"], runs["kind"] = "cumulative_scalar", runs["method"]
    runs["run_id"] = [f"r{i}" for i in range(len(runs))]
    runs["label"] = variant_labels(runs, KEYS)  # as load_study names the settings of a grid
    return Study(
        name="fake",
        path=Path("."),
        plan={"report": {"pairs": [["fsdfm@8", "dfm@1024"]]}},
        runs=runs,
        description="",
        grid_keys=(*KEYS, "seed"),
        seed_keys=("seed",),
        ablation_keys=KEYS,
        n_planned=len(runs),
    )


def test_each_cell_pairs_its_own_seeds_and_recovers_the_built_in_gap():
    study = fake_study()
    t = pair_grid_table(study)
    nums = t.numbers[t.numbers["metric"] == "oracle_nll"]
    assert len(nums) == 18  # 3 sizes x 3 lengths x 2 sequence lengths
    for r in nums.itertuples():
        h, n, length = r._4, r._5, r._6  # the cell's key columns, in KEYS order
        assert r.diff == pytest.approx(d_true(h, n, length), abs=1e-12)
        # paired t on the three seeds, independently: the differences are d + (0.01, -0.01, 0)
        d = np.array([d_true(h, n, length) + NOISE[s] for s in NOISE])
        half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
        assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-9)
    assert (nums["p_holm"] >= nums["p"] - 1e-15).all() and "p (Holm)" in t.columns


def test_the_trend_recovers_the_slopes_per_doubling_and_the_corners():
    study = fake_study()
    t = pair_trend_table(study)
    nums = t.numbers[t.numbers["metric"] == "oracle_nll"].set_index("axis")
    assert nums.loc["model.hidden", "slope"] == pytest.approx(-0.1, abs=1e-9)
    assert nums.loc["methods.dfm.train.steps", "slope"] == pytest.approx(0.05, abs=1e-9)
    assert nums.loc["data.seq_len", "slope"] == pytest.approx(0.02, abs=1e-9)
    assert nums.loc["model.hidden", "fit_min"] == pytest.approx(d_true(32, 300, 32), abs=1e-9)
    assert nums.loc["model.hidden", "fit_max"] == pytest.approx(d_true(128, 3000, 64), abs=1e-9)
    assert (nums["n"] == 54).all()
    assert nums.loc["model.hidden", "ci_low"] < -0.1 < nums.loc["model.hidden", "ci_high"]
    assert nums.loc["model.hidden", "p_holm"] < 0.05  # a 0.1-per-doubling slope against +-0.01 noise


def test_runs_outside_the_pair_and_a_cell_without_a_partner_are_left_out():
    lone = {"model.hidden": 256, "methods.dfm.train.steps": 300, "data.seq_len": 32, "seed": 0}
    extra = [{**lone, "method": "fsdfm", "label": "FS", "steps": 8, "oracle_nll": 9.0}]
    extra += [{**lone, "method": "exact", "label": "exact", "steps": 8, "oracle_nll": 1.0}]
    frame = cell_differences(fake_study(extra), "fsdfm@8", "dfm@1024", "oracle_nll")
    assert len(frame) == 54 and 256 not in set(frame["model.hidden"])


def test_fit_trend_equals_least_squares_and_hc3_by_hand():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.choice([1, 2, 4, 8], 40), "z": rng.choice([10, 30], 40)})
    frame["d"] = 1.0 + 0.3 * np.log2(frame["x"]) + rng.standard_normal(40) * (0.1 + 0.1 * frame["x"])
    tr = fit_trend(frame, ["x", "z"])
    x = np.column_stack([np.ones(40), np.log2(frame["x"]), np.log2(frame["z"])])
    beta, *_ = np.linalg.lstsq(x, frame["d"].to_numpy(), rcond=None)
    assert tr.slopes == pytest.approx(tuple(beta[1:]), abs=1e-10) and tr.intercept == pytest.approx(beta[0])
    # HC3 written out row by row: sum_i x_i x_i' e_i^2 / (1 - h_i)^2, sandwiched
    inv = np.linalg.inv(x.T @ x)
    e = frame["d"].to_numpy() - x @ beta
    meat = sum(np.outer(xi, xi) * ei**2 / (1 - xi @ inv @ xi) ** 2 for xi, ei in zip(x, e))
    se = np.sqrt(np.diag(inv @ meat @ inv))
    half = stats.t.ppf(0.975, 37) * se[1]
    assert tr.ci[0] == pytest.approx((beta[1] - half, beta[1] + half), abs=1e-10)
    assert fit_trend(frame.iloc[:3], ["x", "z"]) is None  # n <= p + 1: no fit


def test_the_figure_draws_the_gap_against_the_widest_axis(tmp_path):
    from fsdfm.report.pair_grid import pair_grid_figure

    (drawn,) = pair_grid_figure(fake_study())
    axes = drawn.figure.get_axes()
    assert len(axes) == 2  # one panel per value of the third axis
    assert axes[0].get_ylabel().startswith("oracle_nll")  # the quality metric, not entropy (no direction)
    # each panel: one line per value of the second axis, three points each (the first axis's values)
    lines = [c for c in axes[0].containers]
    assert len(lines) == 3 and all(len(c.lines[0].get_xdata()) == 3 for c in lines)
    y = sorted(float(v) for c in lines for v in c.lines[0].get_ydata())
    cells = [d_true(h, n, length) for h in HIDDEN for n in STEPS for length in SEQ]
    assert all(any(abs(v - c) < 1e-9 for c in cells) for v in y)


def test_the_plain_pairs_table_points_to_the_grid_tables():
    from fsdfm.report.pairs import pairs_table

    t = pairs_table(fake_study())
    assert t.empty and any("compared cell by cell in table_pair_grid" in n for n in t.notes)


def test_grid_values_a_missing_value_turned_to_floats_are_labelled_as_written():
    # a run that does not depend on an axis has None there, so pandas stores the column as floats (300 -> 300.0)
    extra = [{"method": "data", "label": "data", "steps": None, "oracle_nll": 1.0, "seed": 0}]
    study = fake_study(extra)
    assert study.runs["methods.dfm.train.steps"].dtype == float
    t = pair_grid_table(study)
    shown = [c[3] for c in t.cells]
    assert "hidden=32, train.steps=300, seq_len=32" in shown and not any(".0" in c for c in shown)
    assert "DFM (hidden=32, steps=300, seq_len=32)" in set(study.runs["label"])
