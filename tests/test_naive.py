"""The naive kind (fsdfm/methods/naive.py, fsdfm/naive.py): each rule's output law, a tiny study end to end (fit ->
sample -> evaluate, every metric scoring the rows, train_copy exposing copy_ngram), the report showing its rows and
never marking them best, the listings, and spec errors that name the key."""

from __future__ import annotations

import re
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fsdfm.cli import main
from fsdfm.data import DataConfig, load_corpus
from fsdfm.launch import execute
from fsdfm.methods import METHOD_KINDS, plan_study
from fsdfm.methods.load import load_spec
from fsdfm.naive import TokenCounts, count_tokens, draw_copy_ngram, draw_repeat_top, draw_unigram, training_stream
from fsdfm.records import load, load_records
from fsdfm.report.metric_table import metric_table
from fsdfm.samplers import get_rule
from fsdfm.study.spec import SpecError

REPO = Path(__file__).resolve().parents[1]

STUDY = """
name: tiny_naive
data:
  kind: oracle
  seq_len: 16
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.05, seed: 2, n_train: 200, n_valid: 64}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 24, batch_size: 24, seed: 5}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 3, batch_size: 8, warmup_steps: 1, ema_decay: null}, budgets: [1, 4]}
  naive: {kind: naive, rules: [unigram, repeat_top, copy_ngram], budgets: [1]}
metrics:
  names: [oracle_nll, entropy_nats, rep_n, collapse_ngram, train_copy]
"""


# ------------------------------------------------------------------------------------------- the rules' laws
def test_unigram_draws_follow_the_training_counts():
    counts = TokenCounts(np.array([50, 0, 30, 15, 5], dtype=np.int64))
    tokens = draw_unigram(counts, torch.zeros(0), 400, 25, torch.Generator().manual_seed(0))
    assert tokens.shape == (400, 25) and tokens.dtype == torch.long
    observed = np.bincount(tokens.reshape(-1).numpy(), minlength=5)
    assert observed[1] == 0  # a token absent from the training split is never drawn
    keep = counts.counts > 0
    expected = counts.probs[keep] * tokens.numel()
    # Pearson chi-square against q on the 4 possible tokens: 3 degrees of freedom
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-3


def test_repeat_top_is_the_most_frequent_non_eos_token_everywhere():
    counts = TokenCounts(np.array([5, 9, 40, 9, 1], dtype=np.int64), eos_id=2)  # EOS is the most frequent
    assert counts.top_token == 1  # EOS excluded; 1 and 3 tie at 9: the lowest id
    assert torch.equal(draw_repeat_top(counts, torch.zeros(0), 3, 7), torch.full((3, 7), 1))
    assert TokenCounts(np.array([5, 9, 40]), eos_id=None).top_token == 2


def test_copy_ngram_samples_are_spans_of_the_training_stream():
    train = torch.randint(0, 1000, (30, 8), generator=torch.Generator().manual_seed(1))
    stream = training_stream(train)
    assert torch.equal(stream[8:16], train[1])  # the blocks in order
    tokens = draw_copy_ngram(
        TokenCounts(np.ones(1000, dtype=np.int64)), stream, 500, 8, torch.Generator().manual_seed(2)
    )
    text = stream.tolist()
    spans = {tuple(text[a : a + 8]): a for a in range(len(text) - 8 + 1)}
    starts = [spans.get(tuple(row)) for row in tokens.tolist()]
    assert None not in starts  # every sample is a contiguous span of the training stream
    # starts uniform on {0, ..., 232}: both ends reachable, no span past the end; a chi-square over 4 equal bins
    assert min(starts) >= 0 and max(starts) <= 232
    assert stats.chisquare(np.histogram(starts, bins=4, range=(0, 233))[0]).pvalue > 1e-3


def test_a_naive_rule_is_no_jump_rule_and_runs_no_model():
    rule = get_rule("copy_ngram")
    with pytest.raises(TypeError, match="naive sampler"):
        rule(torch.zeros(1, 1), torch.zeros(1), torch.zeros(1), None)
    with pytest.raises(TypeError, match="naive sampler"):
        rule.sample_loop(None, None)


def test_count_tokens_counts_every_training_token():
    train = torch.tensor([[0, 2, 2], [3, 0, 2]])
    c = count_tokens(train, 5, eos_id=0)
    assert list(c.counts) == [2, 0, 3, 1, 0] and c.n_tokens == 6 and c.top_token == 2
    with pytest.raises(ValueError, match="outside the vocabulary of 3"):
        count_tokens(train, 3)


# ------------------------------------------------------------------------------------------- a tiny study
@pytest.fixture(scope="module")
def naive_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("naive")
    (tmp / "tiny_naive.yaml").write_text(STUDY)
    spec, cells = load_spec(tmp / "tiny_naive.yaml")
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp / "results", executor="debug")
    assert summary.ok, summary.format()
    corpus = load_corpus(DataConfig(**dataclasses.asdict(spec.data)))
    return tmp, plan, corpus


def test_the_study_fits_once_and_samples_every_rule_with_nfe_zero(naive_study):
    tmp, plan, corpus = naive_study
    sdir = tmp / "results" / "tiny_naive"
    (fit,) = load_records(sdir, kind="fit_naive")
    counts = np.bincount(corpus.train.reshape(-1).numpy(), minlength=6)
    assert fit["payload"]["train_tokens"] == corpus.train.numel() == 200 * 16
    assert fit["payload"]["top_token"] == int(np.argmax(counts))
    df = load(sdir)
    naive = df[df.method == "naive"].set_index("rule")
    assert sorted(naive.index) == ["copy_ngram", "repeat_top", "unigram"]
    assert (naive.nfe == 0).all() and (naive.steps == 1).all() and naive.sanity.eq(True).all()
    assert not df[df.method == "dfm"].sanity.eq(True).any()  # only the naive rows are sanity rows
    samples = {
        r["config"]["rule"]: np.load(Path(r["stage_dir"]) / "samples.npy")
        for r in load_records(sdir, kind="sample")
        if r["config"]["sampler"] == "naive"
    }
    assert (samples["repeat_top"] == int(np.argmax(counts))).all()
    stream = corpus.train.reshape(-1).tolist()
    spans = {tuple(stream[a : a + 16]) for a in range(len(stream) - 15)}
    assert all(tuple(row) in spans for row in samples["copy_ngram"].tolist())
    # every metric scored them: repeat_top is caught by entropy and cross-sample collapse, copy_ngram by train_copy
    assert naive.loc["repeat_top", "entropy_nats"] == 0.0 and naive.loc["repeat_top", "collapse_ngram"] == 1.0
    assert naive.loc["copy_ngram", "train_copy"] == 1.0
    assert (naive.oracle_nll > 0).all()


def test_the_data_row_shows_its_own_train_copy(naive_study):
    tmp, plan, corpus = naive_study
    df = load(tmp / "results" / "tiny_naive")
    data = df[df.kind == "data"].train_copy.item()
    # the held-out blocks the data row scores (evaluate_data: valid[n : 2n]), against the training 8-grams, by sets
    n, stream = 24, corpus.train.reshape(-1).tolist()
    grams = {tuple(stream[a : a + 8]) for a in range(len(stream) - 7)}
    held = corpus.valid[n : 2 * n].tolist()
    assert data == pytest.approx(np.mean([any(tuple(r[j : j + 8]) in grams for j in range(9)) for r in held]))


def test_the_report_shows_the_naive_rows_and_never_marks_them_best(naive_study):
    pytest.importorskip("matplotlib")  # the report's extra
    from fsdfm.report import write_report

    tmp, plan, corpus = naive_study
    out = write_report(tmp / "results" / "tiny_naive", tmp / "report")
    main = (tmp / "report" / "table_main.md").read_text()
    assert "train_copy" in main.splitlines()[2] and "sanity rows (model-free samplers: naive)" in main
    lines = [ln for ln in main.splitlines() if ln.startswith("| naive ")]
    assert len(lines) == 3 and all("**" not in ln for ln in lines)
    assert out is not None


def test_a_sanity_row_with_the_best_values_is_not_marked_but_the_best_model_is():
    rows = [{"label": "data (held-out)", "rule": None, "steps": None, "kind": "data", "gen_ppl": 9.0}]
    for seed in range(3):
        rows.append({"label": "A", "rule": "r", "steps": 8, "kind": "dfm", "seed": seed, "gen_ppl": 10.0 + seed / 10})
        rows.append({"label": "B", "rule": "r", "steps": 8, "kind": "dfm", "seed": seed, "gen_ppl": 50.0 + seed / 10})
        rows.append(
            {
                "label": "S",
                "rule": "r",
                "steps": 1,
                "kind": "x",
                "seed": seed,
                "gen_ppl": 1.0 + seed / 10,
                "sanity": True,
            }
        )
    t = metric_table(pd.DataFrame(rows), ["gen_ppl"], name="t", title="t", flags=False)
    bold = {r[0]: any(b) for r, b in zip(t.cells, t.bold)}
    assert bold == {"data (held-out)": False, "A": True, "B": False, "S": False}
    assert any("sanity rows (model-free samplers: S)" in n for n in t.notes)


# ------------------------------------------------------------------------------------------- listings and errors
def test_ls_lists_the_kind_and_its_rules(capsys):
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bnaive +sampler naive, rules unigram, repeat_top, copy_ngram", out)
    assert main(["ls", "rules"]) == 0
    out = capsys.readouterr().out
    for rule in ("unigram", "repeat_top", "copy_ngram"):
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [rule]]
        assert line.endswith("[kinds: naive]")
    assert METHOD_KINDS.get("naive").sanity and not METHOD_KINDS.get("dfm").sanity


@pytest.mark.parametrize(
    "method,message",
    [
        ("{kind: naive, rules: [euler], budgets: [1]}", "methods.n.rules: 'euler' is not a rule of naive"),
        ("{kind: naive, knobs: {temperature: 0.5}, budgets: [1]}", "methods.n.knobs.temperature: a naive method"),
        ("{kind: naive, source: uniform, budgets: [1]}", "methods.n.source: a naive method does not sample"),
        ("{kind: naive, teacher: dfm, budgets: [1]}", "methods.n.teacher: a naive method has no teacher"),
        ("{kind: naive, distill: {K: 8}, budgets: [1]}", "methods.n.distill: a naive method takes no distill"),
        ("{kind: naive}", "methods.n.budgets: list the step budgets"),
        ("{kind: dfm, rules: [copy_ngram], budgets: [1]}", "methods.n.rules: 'copy_ngram' is not a rule of dfm"),
    ],
)
def test_a_setting_the_kind_cannot_use_is_a_spec_error_naming_the_key(tmp_path, method, message):
    spec = STUDY.replace(
        "  naive: {kind: naive, rules: [unigram, repeat_top, copy_ngram], budgets: [1]}", f"  n: {method}"
    )
    (tmp_path / "s.yaml").write_text(spec)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_spec(tmp_path / "s.yaml")


def test_nothing_else_in_fsdfm_names_the_kind():
    for path in (REPO / "fsdfm").rglob("*.py"):
        rel = path.relative_to(REPO / "fsdfm")
        if rel.stem == "naive" and rel.parts[0] in ("methods", "naive.py"):
            continue  # the kind's own file and its library module
        text = path.read_text()
        assert '"naive"' not in text and "'naive'" not in text, f"{rel} names the kind naive"
    out = subprocess.run([sys.executable, "-m", "fsdfm.cli", "ls", "methods"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "naive" in out.stdout


def test_sanity_rows_are_not_an_ablation_of_their_kind():
    from types import SimpleNamespace

    from fsdfm.report.tables import ablation_kinds

    models = pd.DataFrame(
        [
            {"label": "naive: unigram", "kind": "naive", "sanity": True},
            {"label": "naive: copy_ngram", "kind": "naive", "sanity": True},
            {"label": "DFM", "kind": "dfm"},
            {"label": "DFM / T 0.5", "kind": "dfm"},
        ]
    )
    assert ablation_kinds(SimpleNamespace(models=models)) == {"dfm": ["DFM", "DFM / T 0.5"]}
