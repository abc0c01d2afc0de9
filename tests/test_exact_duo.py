"""Kind exact_duo (the exact posterior sampled by Duo's ancestral sampler) and the decomposition of Duo's rows
against it; `set: {methods.NAME: null}` in a cell override drops a method from the matching grid cells."""

from __future__ import annotations

import math

import pytest

from fsdfm.data.oracle import MarkovSource
from fsdfm.launch import execute
from fsdfm.methods import plan_study
from fsdfm.methods.load import load_spec
from fsdfm.records import load, load_samples
from fsdfm.report.oracle import decomposition_frame
from fsdfm.report.oracle_figure import decomposition_figure
from fsdfm.report.summary import load_study
from fsdfm.study.spec import SpecError

DATA = """
name: exact_duo
data:
  kind: oracle
  seq_len: 6
  oracle: {source: markov, vocab_size: 5, order: 1, support: 2, epsilon: 0.01, seed: 1, n_train: 200, n_valid: 32}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 600, batch_size: 600, seed: 5}
evaluator: {kind: none}
data_reference: false
metrics:
  names: [oracle_nll, entropy_nats]
"""

METHODS = """
methods:
  ex: {kind: exact_duo, label: exact (Duo sampler), rules: [ancestral, greedy_tail], budgets: [1, 128]}
  duo: {kind: duo, label: Duo, distill: {curriculum_start: 0.0, curriculum_end: 0.5},
        train: {steps: 3, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [ancestral], budgets: [1]}
  uni: {kind: naive, label: "naive: unigram", rules: [unigram, copy_ngram, repeat_top], budgets: [1]}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact_duo")
    (tmp / "s.yaml").write_text(DATA + METHODS)
    spec, cells = load_spec(tmp / "s.yaml")
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp / "results", executor="debug")
    assert summary.ok, summary.format()
    return tmp / "results" / spec.name


def test_exact_duo_at_many_steps_reproduces_the_sources_nll(study):
    df = load(study)
    src = MarkovSource(5, order=1, support=2, seed=1, epsilon=0.01)
    expected = src.expected_nll_per_token(6).value
    row = df[(df.method == "ex") & (df.rule == "ancestral") & (df.steps == 128)]
    assert row.nfe.item() == 128
    # the standard error of the mean NLL per token over 600 independent samples, from the per-sample values
    samples = load_samples(study)
    per = samples[samples.stage_id == row.stage_id.item()].oracle_nll.to_numpy()
    assert len(per) == 600
    se = per.std(ddof=1) / math.sqrt(len(per))
    assert abs(row.oracle_nll.item() - expected) < 3 * se
    # one step: independent per-position marginals of the uniform-state path, far above the source's NLL
    one = df[(df.method == "ex") & (df.rule == "ancestral") & (df.steps == 1)].oracle_nll.item()
    assert one > expected + 0.3


def test_duo_rows_are_decomposed_against_the_exact_duo_rows(study):
    df = load(study)
    frame = decomposition_frame(load_study(study))
    duo = frame[frame.label == "Duo"]
    assert len(duo) == 1 and duo.source.item() == "uniform"
    exact1 = df[(df.method == "ex") & (df.rule == "ancestral") & (df.steps == 1)].oracle_nll.item()
    assert duo.exact_oracle_nll.item() == pytest.approx(exact1, abs=1e-12)
    model = df[(df.method == "duo") & (df.steps == 1)].oracle_nll.item()
    assert duo.model_ce_excess.item() == pytest.approx(model - exact1, abs=1e-12)
    assert set(frame[frame.label == "exact (Duo sampler)"].kind) == {"exact"}
    # a run on no mixture path (the naive rows) has no exact counterpart: source "?", nothing split, and the
    # figure (more rules than line styles) draws the mixture-path sources only
    naive = frame[frame.label == "naive: unigram"]
    assert set(naive.source) == {"?"} and naive.exact_oracle_nll.isna().all()
    (drawn,) = decomposition_figure(load_study(study))
    assert len(drawn.figure.axes) == 2  # one source (uniform): its two panels


GRID = """
methods:
  a: {kind: exact, label: A, rules: [cumulative_scalar], budgets: [2]}
  b: {kind: exact_duo, label: B, rules: [ancestral], budgets: [2]}
grid:
  seed: [0, 1]
overrides:
  - match: {seed: 1}
    set: {methods.b: null}
"""


def test_a_null_method_in_a_cell_override_drops_it_from_those_cells(tmp_path):
    (tmp_path / "s.yaml").write_text(DATA + GRID)
    spec, cells = load_spec(tmp_path / "s.yaml")
    assert [sorted(c.spec.methods) for c in cells] == [["a", "b"], ["a"]]
    # the duo sampler declares version 2 (its reweighted step): it enters its sample stages only
    samples = [s.config for s in plan_study(spec.name, cells).stages.values() if s.kind == "sample"]
    assert sorted(c.get("sampler_version", "-") for c in samples) == [
        "-",
        "2",
    ]  # a: one stage (seed trains nothing), b: one
    (tmp_path / "bad.yaml").write_text(DATA + GRID.replace("methods.b: null", "methods.bb: null"))
    with pytest.raises(SpecError, match=r"overrides\[0\]\.set\.methods\.bb: unknown method 'bb' \(did you mean 'b'"):
        load_spec(tmp_path / "bad.yaml")
    child = GRID.replace("  b: {kind", "  c: {base: b, label: C}\n  b: {kind")
    (tmp_path / "child.yaml").write_text(DATA + child)
    with pytest.raises(SpecError, match=r"methods c use 'b' as base; drop them too"):
        load_spec(tmp_path / "child.yaml")
