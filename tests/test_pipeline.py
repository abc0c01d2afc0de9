"""End to end through the real stage functions (in-process executor): spec -> stages -> records -> DataFrame."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.launch import execute
from fsdfm.methods import plan_study
from fsdfm.data.oracle import make_oracle
from fsdfm.records import load, load_records
from fsdfm.methods.load import load_spec

REPO = Path(__file__).resolve().parents[1]

ORACLE = """
name: tiny_oracle
data:
  kind: oracle
  seq_len: 12
  oracle: {source: markov, vocab_size: 8, order: 1, support: 2, epsilon: 0.001, seed: 3, n_train: 400, n_valid: 64}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 24, batch_size: 10, seed: 5}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 40, batch_size: 16, lr: 0.003, warmup_steps: 5, ema_decay: 0.9}, rules: [euler, cumulative_scalar], budgets: [1, 4]}
  fs: {kind: fsdfm, teacher: dfm, distill: {K: 3}, train: {steps: 6, batch_size: 8, warmup_steps: 2, ema_decay: 0.9}, budgets: [2]}
metrics:
  names: [oracle_nll, entropy_nats, distinct_2, rep_n]
  pos_divergence: {n_states: 2, n_rollouts: 3, t_start: 0.5, teacher_steps: 8, student_steps: [2]}
"""


@pytest.fixture(scope="module")
def oracle_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oracle")
    spec_path = tmp / "tiny_oracle.yaml"
    spec_path.write_text(ORACLE)
    spec, cells = load_spec(spec_path)
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp / "results", executor="debug")
    return tmp, spec, plan, summary


def test_oracle_study_runs_and_records_known_quantities(oracle_study):
    tmp, spec, plan, summary = oracle_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "tiny_oracle")
    # one row per run: data + dfm 2 rules x 2 budgets + student 1 budget + 1 pos_divergence diagnostic
    assert len(df) == 1 + 4 + 1 + 1
    runs = df[df.kind.isin(["dfm", "fsdfm"])]
    assert sorted(zip(runs.method, runs.rule, runs.steps)) == sorted(
        [
            ("dfm", "euler", 1),
            ("dfm", "euler", 4),
            ("dfm", "cumulative_scalar", 1),
            ("dfm", "cumulative_scalar", 4),
            ("fs", "cumulative_scalar", 2),
        ]
    )
    assert (runs.nfe == runs.steps).all()  # NFE counted by the sampler equals the budget
    assert (runs.wall_s > 0).all() and (runs.tokens_per_s > 0).all()
    # oracle_nll recomputed independently from the stored samples under the same source
    source = make_oracle("markov", vocab_size=8, order=1, support=2, epsilon=0.001, seed=3)
    for rec in load_records(tmp / "results" / "tiny_oracle", kind="evaluate"):
        sample_dir = Path(rec["stage_dir"]).parent / rec["inputs"]["samples"]
        tokens = np.load(sample_dir / "samples.npy")
        assert tokens.shape == (24, 12)  # exactly the requested count: a remainder batch of 4 is kept
        expected = -source.log_prob(tokens).sum() / tokens.size
        assert rec["payload"]["metrics"]["oracle_nll"] == pytest.approx(expected, rel=1e-9)
    data = df[df.kind == "data"].iloc[0]
    # real data from the source scores near the source's own expected NLL per token
    assert abs(data.oracle_nll - data.oracle_expected_nll) < 0.35


def test_rerun_skips_finished_stages_and_changes_nothing(oracle_study):
    tmp, spec, plan, summary = oracle_study
    before = {p: p.read_bytes() for p in (tmp / "results" / "tiny_oracle" / "stages").glob("*/record.json")}
    again = execute(plan, tmp / "results", executor="debug")
    assert again.ok and not again.done and len(again.skipped) == len(plan.stages)
    after = {p: p.read_bytes() for p in before}
    assert before == after


def test_pos_divergence_curve_has_one_value_per_position(oracle_study):
    tmp, *_ = oracle_study
    recs = load_records(tmp / "results" / "tiny_oracle", kind="pos_divergence")
    assert len(recs) == 1
    curves = recs[0]["payload"]["curves"]
    assert len(curves["tv"]) == len(curves["agreement"]) == 12
    assert all(0.0 <= v <= 1.0 for v in curves["tv"] + curves["agreement"])


def test_teacher_record_has_validation_loss_and_unigram_baseline(oracle_study):
    tmp, *_ = oracle_study
    (rec,) = load_records(tmp / "results" / "tiny_oracle", kind="train_dfm")
    m = rec["payload"]["metrics"]
    assert {"val_ce", "val_nll", "elbo_ppl", "unigram_ce", "train_loss_final"} <= set(m)
    assert m["elbo_ppl"] == pytest.approx(np.exp(m["val_nll"]))
    assert rec["provenance"]["git_commit"] and rec["config"]["optim"]["seed"] == 0


def test_cli_dry_run_status_and_json_line(oracle_study):
    tmp, *_ = oracle_study
    spec = tmp / "tiny_oracle.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "--results", str(tmp / "results"), "run", str(spec), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["dry_run"] and last["stages"] == last["done"] > 0
    st = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "--results", str(tmp / "results"), "status", str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert st.returncode == 0, st.stderr
    counts = json.loads(st.stdout.strip().splitlines()[-1])
    assert counts["done"] == last["stages"] and counts["failed"] == 0 and counts["pending"] == 0


TINY = """
name: tiny_threads
data:
  kind: oracle
  seq_len: 8
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.001, seed: 1, n_train: 64, n_valid: 16}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 4, batch_size: 4, seed: 0}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 2, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [euler], budgets: [2]}
metrics:
  names: [entropy_nats]
"""


def test_cli_threads_reach_the_stages_and_their_records(tmp_path):
    """`fsdfm run --threads 2` runs every stage with 2 torch threads (this test process is pinned to 1), and each
    record says so, with the load average around it; the DataFrame has a threads column."""
    spec = tmp_path / "tiny_threads.yaml"
    spec.write_text(TINY)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsdfm.cli",
            "--results",
            str(tmp_path / "results"),
            "run",
            str(spec),
            "--executor",
            "inline",
            "--threads",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = load_records(tmp_path / "results" / "tiny_threads")
    assert len(records) >= 3  # train, sample, evaluate (and the data row)
    for rec in records:
        prov = rec["provenance"]
        assert prov["torch_threads"] == 2 and prov["cpu_count"] == os.cpu_count()
        assert set(prov["loadavg_1min"]) == {"start", "end"}
    assert set(load(tmp_path / "results" / "tiny_threads").threads) == {2}
    bad = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "run", str(spec), "--threads", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--threads" in bad.stderr and "positive integer" in bad.stderr


def test_every_evaluate_stage_writes_a_per_sample_table_that_load_samples_reads(oracle_study):
    from fsdfm.records import load_samples

    tmp, *_ = oracle_study
    study = tmp / "results" / "tiny_oracle"
    df, samples = load(study), load_samples(study)
    evaluated = df[df.kind != "pos_divergence"]
    assert set(samples.run_id) == set(evaluated.run_id)  # the data row's stage writes one too
    assert (samples.groupby("run_id").size() == 24).all()
    assert {
        "study",
        "run_id",
        "stage_id",
        "method",
        "rule",
        "steps",
        "sample",
        "length",
        "entropy_nats",
        "rep_n",
        "oracle_nll",
    } <= set(samples.columns)
    source = make_oracle("markov", vocab_size=8, order=1, support=2, epsilon=0.001, seed=3)
    for rec in load_records(study, kind="evaluate"):
        tokens = np.load(Path(rec["stage_dir"]).parent / rec["inputs"]["samples"] / "samples.npy")
        rows = samples[samples.stage_id == Path(rec["stage_dir"]).name].sort_values("sample")
        # per-sample oracle NLL per token, recomputed from the stored tokens; its mean is the run's oracle_nll
        np.testing.assert_allclose(rows.oracle_nll, -source.log_prob(tokens) / tokens.shape[1], rtol=1e-12)
        m = rec["payload"]["metrics"]
        assert rows.oracle_nll.mean() == pytest.approx(m["oracle_nll"], rel=1e-12)
        assert rows.entropy_nats.mean() == pytest.approx(m["entropy_nats"], rel=1e-12)
        assert rows.rep_n.mean() == pytest.approx(m["rep_n"], rel=1e-12)
        assert m["samples_per_metric"] == {"entropy_nats": 24, "distinct_2": 24, "rep_n": 24, "oracle_nll": 24}
    assert (samples.length == 12).all()  # oracle data has no EOS: every token counts


class _WordCorpus:
    """What score_samples asks a corpus for: its tokenizer (none: no end-of-text marker), EOS id and training
    tokens (read only by metrics that need the training split: none here)."""

    tokenizer = None
    eos_id = 1
    train = None


def test_per_sample_nlls_summed_and_pooled_reproduce_the_runs_gen_ppl_exactly(tmp_path):
    import math

    from fsdfm.methods.evaluate import score_samples
    from fsdfm.records import read_per_sample
    from metrics_fixtures import word_evaluator

    texts = ["the cat sat on the mat", "a dog ran <eos> the cat", "big red dog <eos> <eos> a", "the the the the"]
    tokens = np.array([[2, 3, 5, 6, 2, 7], [8, 4, 9, 1, 2, 3], [10, 12, 4, 1, 1, 8], [2, 2, 2, 2, 2, 2]])
    config = {
        "data": {"kind": "text"},
        "seed": 0,
        "metrics": {"mauve_featurizer": "minilm", "mauve_buckets": "auto", "self_bleu_subsample": None},
    }
    out = score_samples(
        config,
        tokens,
        texts,
        None,
        word_evaluator(),
        _WordCorpus(),
        tmp_path,
        ["gen_ppl", "gen_ppl_seq_mean", "entropy_nats"],
    )
    table = read_per_sample(tmp_path / "per_sample.csv")
    m = out["metrics"]
    assert list(table["sample"]) == [0, 1, 2, 3] and list(table["length"]) == [6, 3, 3, 6]
    assert math.exp(math.fsum(table["nll"]) / table["n_tokens"].sum()) == m["gen_ppl"]
    assert table["n_tokens"].sum() == m["gen_ppl_n_tokens"] == 5 + 5 + 4 + 3  # the second EOS of sample 2 is not scored
    # gen_ppl_seq_mean: the mean over samples of exp(per-sample mean NLL)
    assert np.mean(np.exp(table["seq_nll"] / table["seq_n_tokens"])) == pytest.approx(m["gen_ppl_seq_mean"], rel=1e-12)
    assert m["gen_ppl_n_truncated"] == 0 and m["samples_per_metric"]["gen_ppl"] == 4 and m["n_samples"] == 4


def test_evaluate_records_mauve_n_buckets_seeds_and_its_spread(tmp_path):
    from fsdfm.methods.evaluate import score_samples
    from metrics_fixtures import word_evaluator

    texts = ["the cat sat on the mat", "a dog ran on the mat", "big red dog sat", "the small cat ran"]
    refs = ["a cat sat<eos>", "the dog ran on a mat", "a big blue dog", "the red cat sat on a mat"]
    tokens = np.array([[2, 3, 5, 6, 2, 7], [8, 4, 9, 6, 2, 7], [10, 12, 4, 5, 1, 1], [2, 11, 3, 9, 1, 1]])
    config = {
        "data": {"kind": "text"},
        "seed": 7,
        "metrics": {
            "mauve_featurizer": "evaluator",
            "mauve_buckets": "auto",
            "mauve_seeds": 6,
            "self_bleu_subsample": None,
        },
    }
    out = score_samples(config, tokens, texts, refs, word_evaluator(), _WordCorpus(), tmp_path, ["mauve", "self_bleu"])
    m, d = out["metrics"], out["metric_details"]["mauve"]
    assert (m["mauve_n"], m["mauve_buckets"]) == (4, 2) and d["n_per_side"] == 4 and d["num_buckets"] == 2
    assert d["seeds"] == [7, 8, 9, 10, 11, 12] and d["featurizer"] == "evaluator" and len(d["featurizer_sha256"]) == 64
    assert m["mauve"] == pytest.approx(np.mean(d["values"])) and m["mauve_std"] == pytest.approx(
        np.std(d["values"], ddof=1)
    )
    assert "<|endoftext|>" in d["text_convention"] and out["metric_details"]["self_bleu"]["text_convention"]
    assert m["samples_per_metric"] == {"mauve": 4, "self_bleu": 4}
    assert list(
        np.genfromtxt(tmp_path / "per_sample.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")["length"]
    ) == [6, 6, 4, 4]  # tokens before the first EOS (id 1)
