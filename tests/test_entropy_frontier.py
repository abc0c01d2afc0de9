"""Matched-entropy interpolation and the gen-PPL-entropy frontier on a synthetic runs frame with a known answer."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd

from fsdfm.report.entropy_frontier import entropy_frontier, families, interpolate_log, matched_entropy_table


def _runs(offsets=(0.0, 0.0, 0.0)):
    """log gen_ppl = entropy - 1 exactly at every setting; seed s shifts the entropy of every point by offsets[s]."""
    rows = []
    for s, off in enumerate(offsets):
        for knobs, h in (("temperature=0.7", 3.0), ("", 4.0), ("temperature=1.15", 5.0)):
            x = h + off
            rows.append({"kind": "dfm", "rule": "mdlm", "steps": 8, "seed": s, "knobs": knobs or np.nan,
                         "entropy_nats": x, "gen_ppl": math.exp(x - 1.0)})  # fmt: skip
        rows.append({"kind": "fsdfm", "rule": "cumulative_scalar", "steps": 8, "seed": s, "knobs": np.nan,
                     "entropy_nats": 4.0, "gen_ppl": 30.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_interpolation_is_exact_on_a_log_linear_frontier_and_never_extrapolates():
    assert math.isclose(interpolate_log(np.array([3.0, 4.0]), np.exp([2.0, 3.0]), 3.25), math.exp(2.25))
    assert math.isnan(interpolate_log(np.array([3.0, 4.0]), np.exp([2.0, 3.0]), 4.5))


def test_matched_entropy_table_reads_the_frontier_at_the_data_entropy():
    t = matched_entropy_table(_runs(), data_entropy=3.5)
    assert len(t.cells) == 1  # the one-setting FS-DFM family has no frontier
    row = t.numbers.iloc[0]
    assert row["family"] == "dfm / mdlm / 8 steps" and row["n_settings"] == 3 and row["n_seeds"] == 3
    assert math.isclose(row["value"], math.exp(2.5), rel_tol=1e-12)
    assert math.isclose(row["lo"], math.exp(2.5), rel_tol=1e-9) and math.isclose(row["hi"], math.exp(2.5), rel_tol=1e-9)
    # seeds that disagree give the bootstrap CI a width
    t2 = matched_entropy_table(_runs((-0.2, 0.0, 0.3)), data_entropy=3.5).numbers.iloc[0]
    assert t2["lo"] < t2["hi"] and t2["lo"] <= t2["value"] <= t2["hi"]
    assert matched_entropy_table(_runs(), data_entropy=9.0).cells[0][-1] == "outside the sweep"


def test_families_group_the_sweep_knobs_and_keep_the_others():
    df = _runs()
    df["knobs"] = [("greedy_tail=True," + k) if isinstance(k, str) else "greedy_tail=True" for k in df["knobs"]]
    assert set(families(df)["family"]) == {"dfm / mdlm / 8 steps / greedy_tail=True",
                                           "fsdfm / cumulative_scalar / 8 steps / greedy_tail=True"}  # fmt: skip


def test_the_frontier_figure_draws_one_curve_per_family(tmp_path):
    data = pd.DataFrame([{"entropy_nats": 3.6, "gen_ppl": 12.0}])
    drawn = entropy_frontier(SimpleNamespace(models=_runs(), data=data, name="toy"))
    (d,) = drawn
    ax = d.figure.axes[0]
    assert len(ax.get_legend_handles_labels()[1]) == 3  # two families and the data star


def test_protocol_table_compares_each_switch_with_its_one_switch_neighbour():
    from fsdfm.report.protocol import protocol_table

    runs = pd.DataFrame(
        [
            {"steps": 64, "knobs": np.nan, "gen_ppl": 100.0, "gen_ppl_raw": 90.0, "gen_ppl_seq_mean": 99.0,
             "gen_ppl_first_scored": 110.0, "gen_ppl_short_ctx": 150.0},
            {"steps": 64, "knobs": "precision=float32", "gen_ppl": 80.0},
            {"steps": 64, "knobs": "top_p=0.9", "gen_ppl": 50.0},
        ]
    )  # fmt: skip
    n = protocol_table(runs).numbers.set_index("switch")
    assert n.loc["per-sample mean instead of token-pooled (raw ids)", "ratio"] == 99.0 / 90.0
    assert n.loc["raw ids instead of re-tokenized text", "ratio"] == 0.9
    assert n.loc["float32 draws instead of float64 (precision=float32)", "ratio"] == 0.8
    assert n.loc["nucleus on (top_p=0.9)", "reference"] == 100.0
    assert n.loc["evaluator context a quarter of the sample", "value"] == 150.0
