"""One registry entry per metric: every entry is ranked, sourced and placed in its views, the data-target metrics are
the registry's, and adding a metric is one registered function that reaches the report's main table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fsdfm.cli import main
from fsdfm.metrics import (
    METRICS,
    SAMPLE_METRICS,
    MetricOutcome,
    corpus_metric_names,
    data_target_metrics,
    register_metric,
    shown,
    unregister_metric,
)
from fsdfm.metrics.registry import DIRECTIONS, TARGETS, VIEWS
from fsdfm.report.summary import load_study
from fsdfm.report.table import header
from fsdfm.report.tables import cost_metrics, main_table, pos_metrics


def is_subsequence(part: tuple, whole: tuple) -> bool:
    it = iter(whole)
    return all(x in it for x in part)


def test_views_keep_the_report_columns_in_order():
    # properties of every registered metric, not a list of today's: a view lists exactly the metrics that name it,
    # in their positions; every metric says how it is ranked (a direction, None, or the data row as its target)
    for view in VIEWS:
        names = shown(view)
        positions = [METRICS.get(n).position(view) for n in names]
        assert positions == sorted(positions) and None not in positions
        assert set(names) == {n for n in METRICS.names() if METRICS.get(n).position(view) is not None}
    for name in METRICS.names():
        info = METRICS.get(name)
        assert info.direction in DIRECTIONS and info.target in TARGETS and info.unit and info.description
        assert info.computed or info.recorded_by  # computed from samples, or recorded by a named stage
        assert info.sources  # what computes it (fsdfm.versions digests them)
    assert set(data_target_metrics()) == {n for n in METRICS.names() if METRICS.get(n).target == "data"}
    # the headline columns keep their relative order (other metrics may sit between them)
    assert is_subsequence(("gen_ppl", "gen_ppl_seq_mean", "entropy_nats", "mauve", "rep_n"), shown("main"))
    assert is_subsequence(("gen_ppl", "entropy_nats", "mauve", "rep_n"), shown("seeds"))
    assert cost_metrics() == ("nfe", "sampling_wall_s", "tokens_per_s", "peak_mem")
    assert pos_metrics() == ("pos_divergence", "pos_agreement", "pos_divergence_slope")


def test_entries_say_what_they_need_and_who_records_the_rest():
    assert METRICS.get("gen_ppl").needs == ("texts", "evaluator")
    assert METRICS.get("mauve").needs == ("texts", "references")
    assert METRICS.get("nfe").compute is None and "sampling stage" in METRICS.get("nfe").recorded_by
    assert METRICS.get("posterior_kl").recorded_by and not METRICS.get("posterior_kl").computed
    # every metric is either computed or recorded, never both
    assert all(METRICS.get(n).computed != bool(METRICS.get(n).recorded_by) for n in METRICS.names())
    # oracle corpus metrics are computed but not from samples alone
    assert "oracle_nll" not in SAMPLE_METRICS and "oracle_nll" in METRICS
    assert corpus_metric_names({"data": {"kind": "oracle"}}) == (
        "ngram_kl",
        "ngram_kl_floor",
        "ngram_tv",
        "ngram_tv_floor",
        "oracle_entropy_rate",
        "oracle_expected_nll",
        "oracle_nll",
    )
    assert corpus_metric_names({"data": {"kind": "text"}}) == ()
    with pytest.raises(ValueError, match="unknown report views"):
        register_metric("x_bad_view", direction="min", unit="", family="toy", description="", show={"main_": 1})
    assert "x_bad_view" not in METRICS


@pytest.fixture
def mean_token_id():
    """A toy metric, registered for the duration of the test: the mean of the token ids, higher is better,
    shown first in the main table."""

    @register_metric(
        "mean_token_id",
        direction="max",
        unit="id",
        family="toy",
        show={"main": 0},
        description="mean of the samples' token ids",
    )
    def _mean_token_id(x):
        return MetricOutcome(float(x.token_ids.double().mean()), x.n)

    yield "mean_token_id"
    unregister_metric("mean_token_id")


SPEC = {
    "name": "toy_metric",
    "data": {
        "kind": "oracle",
        "seq_len": 8,
        "oracle": {"source": "markov", "vocab_size": 8, "order": 1, "support": 2, "n_train": 64, "n_valid": 16},
    },
    "evaluator": {"kind": "none"},
    "metrics": {"names": ["mean_token_id", "entropy_nats"]},
    "sampling": {"n_samples": 4, "batch_size": 4},
    "model": {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2},
    "methods": {"dfm": {"kind": "dfm", "budgets": [1, 2], "train": {"steps": 2, "warmup_steps": 1, "batch_size": 4}}},
}


def test_a_registered_metric_is_a_column_of_the_main_table(mean_token_id, tmp_path):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(SPEC))
    results = tmp_path / "results"
    assert main(["--results", str(results), "run", str(tmp_path / "toy.yaml"), "--executor", "debug"]) == 0
    study_dir = results / "toy_metric"
    table = main_table(load_study(study_dir))
    # the first metric column (show position 0), with its direction arrow
    metric_columns = [c for c in table.columns[table.n_label_columns :] if c != "n"]
    assert metric_columns[0] == header(mean_token_id) == "mean_token_id ↑"
    numbers = table.numbers
    checked = 0
    for stage in sorted((study_dir / "stages").glob("evaluate-*")):
        payload = json.loads((stage / "record.json").read_text())["payload"]
        tokens = np.load(study_dir / "stages" / payload["samples_stage"] / "samples.npy")
        expected = float(tokens.astype(np.float64).mean())  # the stored samples, read independently
        assert payload["metrics"][mean_token_id] == pytest.approx(expected, abs=1e-12)
        assert expected in set(numbers[f"{mean_token_id}_mean"].astype(float))
        checked += 1
    assert checked == 2  # one evaluate stage per step budget
