"""Sampler knobs through specs: validation at load (a knob a method cannot use is a spec error naming the key),
stage ids (only set knobs enter a config), and a study that samples the exact denoiser with the new samplers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.data.oracle import MarkovSource
from fsdfm.methods import plan_study
from fsdfm.methods.load import load_spec
from fsdfm.study.spec import SpecError

ORACLE = """
name: t
data:
  kind: oracle
  seq_len: 6
  oracle: {source: markov, vocab_size: 5, order: 1, support: 2, epsilon: 0.01, seed: 1, n_train: 100, n_valid: 140}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 64, batch_size: 64, seed: 3}
evaluator: {kind: none}
metrics: {names: [oracle_nll, entropy_nats]}
methods:
"""


def _spec(tmp_path, methods: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(ORACLE + methods)
    return p


@pytest.mark.parametrize(
    "methods,message",
    [
        (
            "  e: {kind: exact, rules: [confidence], steps: [2], knobs: {tau: 0.5}}\n",
            r"methods\.e\.knobs\.tau: knob 'tau' applies only to rule\(s\) threshold",
        ),
        (
            "  e: {kind: exact, steps: [2], knobs: {temprature: 0.5}}\n",
            r"methods\.e\.knobs\.temprature: unknown sampler knob .*did you mean 'temperature'",
        ),
        ("  e: {kind: exact, steps: [2], knobs: {top_p: 1.5}}\n", r"methods\.e\.knobs\.top_p: top_p must lie in"),
        (
            "  e: {kind: exact, source: uniform, steps: [2], knobs: {block_length: 2}}\n",
            r"methods\.e\.knobs\.block_length: .*needs the mask source",
        ),
        (
            "  e: {kind: exact, source: uniform, rules: [confidence], steps: [2]}\n",
            r"methods\.e\.rules: 'confidence' needs the mask source",
        ),
        (
            "  a: {kind: ar, steps: [2], knobs: {temperature: 0.5}}\n",
            r"methods\.a\.knobs\.temperature: a ar method's sampler takes no sampler knobs",
        ),
        (
            "  e: {kind: exact, steps: [2, 4], knobs: {block_length: 2}}\n",
            r"methods\.e\.knobs\.block_length: 2 cuts seq_len 6 into 3 blocks; every step budget must be at least that",
        ),
        (
            "  e: {kind: exact, rules: [remdm], steps: [2], knobs: {remask: lop}}\n",
            r"methods\.e\.knobs\.remask: remask must be one of",
        ),
    ],
)
def test_a_knob_the_method_cannot_use_is_a_spec_error_naming_the_key(tmp_path, methods, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, methods))


def test_only_set_knobs_enter_the_stage_config(tmp_path):
    plain = "  e: {kind: exact, rules: [cumulative_scalar], steps: [2]}\n"
    spec, cells = load_spec(_spec(tmp_path, plain))
    (sample,) = [s for s in plan_study(spec.name, cells).stages.values() if s.kind == "sample"]
    assert "knobs" not in sample.config
    spec, cells = load_spec(_spec(tmp_path, plain.replace("steps: [2]", "steps: [2], knobs: {temperature: 0.7}")))
    plan = plan_study(spec.name, cells)
    (knobbed,) = [s for s in plan.stages.values() if s.kind == "sample"]
    assert knobbed.config["knobs"] == {"temperature": 0.7} and knobbed.id != sample.id
    (run,) = [r for r in plan.runs if r.params["method"] == "e"]
    assert run.params["knobs"] == "temperature=0.7"


def test_a_study_samples_the_exact_denoiser_with_the_new_samplers(tmp_path):
    from fsdfm.launch import execute
    from fsdfm.records import load

    methods = (
        "  conf: {kind: exact, rules: [confidence], steps: [6], knobs: {score: margin}}\n"
        "  thr: {kind: exact, rules: [threshold], steps: [6], knobs: {tau: 0.3}}\n"
        "  re: {kind: exact, rules: [remdm], steps: [4], knobs: {remask: loop, top_p: 0.9, greedy_tail: true}}\n"
    )
    spec, cells = load_spec(_spec(tmp_path, methods))
    summary = execute(plan_study(spec.name, cells), tmp_path / "results", executor="debug")
    assert summary.ok, summary.format()
    df = load(tmp_path / "results" / spec.name)
    df = df[df.method != "data"]
    assert sorted(df.method) == ["conf", "re", "thr"]
    assert set(df.knobs) == {"score=margin", "tau=0.3", "greedy_tail=True,remask=loop,top_p=0.9"}
    expected = MarkovSource(5, order=1, support=2, seed=1, epsilon=0.01).expected_nll_per_token(6).value
    # margin order at budget L with the exact denoiser is an exact sampler: near the source (64 samples: loose)
    assert abs(df[df.method == "conf"].oracle_nll.item() - expected) < 0.5
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / spec.name / "stages").glob("*/record.json")]
    nfe = [r["payload"]["nfe_per_sample"] for r in records if "nfe_per_sample" in r.get("payload", {})]
    assert nfe and all(1 <= d["min"] <= d["mean"] <= d["max"] <= 6 for d in nfe)
