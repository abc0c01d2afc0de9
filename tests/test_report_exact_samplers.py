"""Each sampler's own error (fsdfm.report.exact_samplers): CE excess from pooled per-sample values, what a sampler
removes against the path's base sampler with Welch's interval, Holm over the table, and when there is no table."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsdfm.report.exact_samplers import exact_samplers_frame, exact_samplers_table
from fsdfm.report.significance import holm
from fsdfm.report.summary import Study

H_L = 1.0


def _study(tmp_path, samplers, n=200, seeds=(0, 1)) -> tuple[Study, dict]:
    """Exact runs (stage kind exact_posterior, one mask path) of `samplers`: {(label, rule, knobs): {steps: excess}};
    per-sample oracle_nll = H_L + excess + N(0, 0.3) noise, `seeds` runs per setting. Returns the study and the
    pooled per-sample values by (label, steps)."""
    rng = np.random.default_rng(0)
    stages, rows, samples, pooled = {}, [], [], {}
    model = "model-exact"
    stages[model] = {"kind": "exact_posterior", "inputs": {}, "config": {"source": "mask", "scheduler": {"k": 1}}}
    for (label, rule, knobs), by_steps in samplers.items():
        for steps, excess in by_steps.items():
            for seed in seeds:
                i = len(rows)
                ev, smp, rid = f"evaluate-{i}", f"sample-{i}", f"{label}/{rule}/{steps}/seed={seed}#{i}"
                stages[ev] = {"kind": "evaluate", "inputs": {"samples": smp}, "config": {}}
                stages[smp] = {"kind": "sample", "inputs": {"model": model}, "config": {}}
                v = H_L + excess + 0.3 * rng.standard_normal(n)
                pooled.setdefault((label, steps), []).extend(v)
                rows.append(dict(run_id=rid, stage_id=ev, kind="exact", label=label, rule=rule, knobs=knobs or None,
                                 steps=steps, seed=seed, oracle_nll=v.mean(), oracle_expected_nll=H_L))  # fmt: skip
                samples += [{"run_id": rid, "oracle_nll": x} for x in v]
    study = Study(name="s", path=tmp_path, plan={"stages": stages}, runs=pd.DataFrame(rows), description="",
                  grid_keys=(), seed_keys=("seed",), ablation_keys=(), n_planned=len(rows),
                  samples=pd.DataFrame(samples))  # fmt: skip
    return study, {k: np.array(v) for k, v in pooled.items()}


def test_removed_is_the_base_minus_the_sampler_with_welch_and_holm(tmp_path):
    study, pooled = _study(
        tmp_path,
        {
            ("exact / mdlm", "mdlm", ""): {4: 1.0, 8: 0.5},
            ("exact / confidence", "confidence", ""): {4: 0.4, 8: 0.45},
            ("exact / margin", "confidence", "score=margin"): {4: 1.2, 8: 0.5},
        },
    )
    frame = exact_samplers_frame(study).set_index(["label", "steps"])
    assert (frame["base"] == "exact / mdlm").all()
    base8, conf8 = pooled[("exact / mdlm", 8)], pooled[("exact / confidence", 8)]
    assert frame.loc[("exact / mdlm", 8), "n"] == 400
    assert frame.loc[("exact / mdlm", 8), "ce_excess"] == pytest.approx(base8.mean() - H_L)
    assert math.isnan(frame.loc[("exact / mdlm", 8), "removed"])  # the base is not compared with itself
    r = frame.loc[("exact / confidence", 8)]
    assert r["removed"] == pytest.approx(base8.mean() - conf8.mean())
    assert r["p"] == pytest.approx(stats.ttest_ind(base8, conf8, equal_var=False).pvalue, rel=1e-9)
    assert r["share_removed"] == pytest.approx((base8.mean() - conf8.mean()) / (base8.mean() - H_L))
    assert frame.loc[("exact / confidence", 4), "removed"] == pytest.approx(0.6, abs=0.1)  # 1.0 - 0.4, noise 0.02
    assert frame.loc[("exact / margin", 4), "removed"] < 0  # adds error: negative
    ps = exact_samplers_frame(study)
    assert ps["p_holm"].tolist() == pytest.approx(holm(ps["p"].tolist()), nan_ok=True)
    table = exact_samplers_table(study)
    cells = {(c[1], c[3]): c for c in table.cells}
    assert cells[("exact / mdlm", "8")][7] == "base"
    assert "exact / margin (score=margin)" in {c[1] for c in table.cells}
    bold = {(c[1], c[3]): b[7] for c, b in zip(table.cells, table.bold)}
    assert bold[("exact / confidence", "4")] and not bold[("exact / margin (score=margin)", "4")]


def test_a_path_with_one_sampler_gives_no_table(tmp_path):
    study, _ = _study(tmp_path, {("exact / mdlm", "mdlm", ""): {4: 1.0, 8: 0.5}})
    assert exact_samplers_frame(study).empty and exact_samplers_table(study).empty


def test_a_ce_below_h_l_is_flagged_sharper_and_never_credited(tmp_path):
    # the "confidence" sampler samples below the source's entropy (CE excess -0.3 < 0): not an error removed
    study, _ = _study(
        tmp_path, {("exact / mdlm", "mdlm", ""): {64: 0.15}, ("exact / confidence", "confidence", ""): {64: -0.3}}
    )
    r = exact_samplers_frame(study).set_index("label").loc["exact / confidence"]
    assert r["below_h"] and r["removed"] == pytest.approx(0.45, abs=0.05) and r["p_holm"] < 0.001
    assert math.isnan(r["share_removed"])
    table = exact_samplers_table(study)
    row = next(i for i, c in enumerate(table.cells) if c[1] == "exact / confidence")
    assert "below H_L" in table.cells[row][8] and not any(table.bold[row])
