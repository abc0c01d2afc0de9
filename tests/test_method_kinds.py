"""Adding a method kind is one file (tests/fixtures/unigram_kind.py), and what the spec layer checks per kind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.launch import execute
from fsdfm.methods import METHOD_KINDS, SAMPLERS, plan_study
from fsdfm.records import load, load_records
from fsdfm.study.graph import STAGE_KINDS
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec_dict

REPO = Path(__file__).resolve().parents[1]
ORACLE_DATA = {
    "kind": "oracle",
    "seq_len": 16,
    "oracle": {
        "source": "markov",
        "vocab_size": 6,
        "order": 1,
        "support": 2,
        "epsilon": 0.05,
        "seed": 2,
        "n_train": 300,
        "n_valid": 64,
    },
}


@pytest.fixture()
def unigram_kind():
    """Import the one-file kind, and unregister it afterwards (other tests list the kinds)."""
    spec = importlib.util.spec_from_file_location("unigram_kind", REPO / "tests" / "fixtures" / "unigram_kind.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["unigram_kind"] = module
    spec.loader.exec_module(module)
    yield module
    for registry, name in ((METHOD_KINDS, "unigram"), (SAMPLERS, "unigram"), (STAGE_KINDS, "fit_unigram")):
        registry._items.pop(name, None)
    sys.modules.pop("unigram_kind", None)


def test_a_one_file_kind_runs_a_study_end_to_end(unigram_kind, tmp_path):
    raw = {
        "name": "uni",
        "data": ORACLE_DATA,
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "sampling": {"n_samples": 400, "batch_size": 400, "seed": 1},
        "metrics": {"names": ["oracle_nll", "entropy_nats"]},
        "methods": {"uni": {"kind": "unigram", "budgets": [1]}},
    }
    spec, cells = load_spec_dict(raw, "uni.yaml")
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp_path / "results", executor="debug")
    assert summary.ok, summary.format()
    df = load(tmp_path / "results" / "uni")
    row = df[df.method == "uni"]
    assert len(row) == 1 and row.kind.item() == "unigram" and row.rule.item() == "marginal"
    (fit,) = load_records(tmp_path / "results" / "uni", kind="fit_unigram")
    (ev,) = load_records(tmp_path / "results" / "uni", kind="evaluate")
    tokens = np.load(Path(ev["stage_dir"]).parent / ev["inputs"]["samples"] / "samples.npy")
    # the known answer: the training marginal, counted independently from the corpus the stage read
    from fsdfm.data import DataConfig, load_corpus

    train = load_corpus(DataConfig(**ORACLE_DATA), tmp_path / "cache").train.numpy().ravel()
    marginal = np.bincount(train, minlength=6) / train.size
    empirical = np.bincount(tokens.ravel(), minlength=6) / tokens.size
    assert np.allclose(fit["payload"]["probs"], marginal, atol=1e-12)
    # 6,400 draws: each frequency's standard error is at most 0.5 / 80 = 0.00625
    assert np.abs(empirical - marginal).max() < 0.03
    assert row.oracle_nll.item() > 0


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("dfm", {}),
        ("fsdfm", {"teacher": "t"}),
        ("ar", {}),
        ("flm", {}),
        ("fmlm", {"teacher": "f"}),
        ("exact", {}),
    ],
)
def test_a_misspelt_model_key_is_a_spec_error_for_every_kind(kind, extra):
    methods = {
        "t": {"kind": "dfm", "budgets": [1]},
        "f": {"kind": "flm", "budgets": [1]},
        "m": {"kind": kind, "budgets": [1], "model": {"hiden": 32}, **extra},
    }
    raw = {
        "name": "x",
        "data": ORACLE_DATA,
        "evaluator": {"kind": "none"},
        "metrics": {"names": ["oracle_nll"]},
        "methods": methods,
    }
    with pytest.raises(SpecError, match=r"unknown key 'methods\.m\.model\.hiden'.*did you mean 'hidden'"):
        load_spec_dict(raw, "x.yaml", check_files=False)


def test_a_misspelt_model_key_is_a_spec_error_for_a_released_checkpoint(tmp_path):
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    raw = {
        "name": "x",
        "data": ORACLE_DATA,
        "evaluator": {"kind": "none"},
        "metrics": {"names": ["oracle_nll"]},
        "methods": {
            "r": {"kind": "released", "budgets": [1], "checkpoint": {"path": str(ckpt)}, "model": {"n_head": 2}}
        },
    }
    with pytest.raises(SpecError, match=r"unknown key 'methods\.r\.model\.n_head'.*did you mean 'n_heads'"):
        load_spec_dict(raw, "x.yaml", check_files=False)


def test_kind_settings_are_built_once_at_load_as_the_kinds_dataclass():
    from fsdfm.flm import FLMConfig
    from fsdfm.methods import FSDFMSettings

    raw = {
        "name": "x",
        "data": ORACLE_DATA,
        "evaluator": {"kind": "none"},
        "metrics": {"names": ["oracle_nll"]},
        "methods": {
            "t": {"kind": "dfm", "budgets": [1]},
            "s": {"kind": "fsdfm", "teacher": "t", "budgets": [2], "distill": {"K": 3, "shortcut": "heun"}},
            "f": {"kind": "flm", "budgets": [1]},
        },
    }
    spec, _ = load_spec_dict(raw, "x.yaml", check_files=False)
    assert spec.methods["s"].settings == FSDFMSettings(K=3, shortcut="heun")
    assert spec.methods["f"].settings == FLMConfig()
    assert spec.methods["t"].settings is None
    assert spec.methods["s"].budgets == (2,)


def test_the_spec_schema_imports_no_method_code_and_no_torch():
    code = (
        "import sys, fsdfm.study.spec; print(sorted(m for m in sys.modules if m.startswith('fsdfm.methods')), "
        "'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar"])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_the_sample_stage_counts_nfe_with_the_counting_wrapper(rule, n_steps, tmp_path):
    """N steps evaluate the network N times per sample: with 5 samples in batches of 2 (a remainder of 1) the
    counter sees 3 N calls and 5 N rows; the recorded nfe is N, as the time grid has always said."""
    import torch

    from fsdfm.data import DataConfig, load_corpus
    from fsdfm.methods.common import SAMPLERS, save_dit
    from fsdfm.methods.evaluate import sample_stage
    from fsdfm.model import DiT, model_config

    corpus = load_corpus(DataConfig(**ORACLE_DATA), tmp_path / "cache")
    torch.manual_seed(0)
    path_cfg = {"source": "mask", "scheduler": {"name": "polynomial", "n": 1.0}}
    model = DiT(
        model_config(
            "tiny",
            corpus.vocab_size,
            corpus.seq_len,
            hidden=32,
            cond_dim=16,
            n_blocks=1,
            n_heads=2,
            input_vocab_size=corpus.vocab_size + 1,
        )
    )
    save_dit(tmp_path / "model", model, path_cfg, h_conditioned=False)
    cfg = {
        "data": ORACLE_DATA,
        "sampler": "dfm",
        "rule": rule,
        "steps": n_steps,
        "t_end": 1.0,
        "n_samples": 5,
        "batch_size": 2,
        "seed": 0,
        "precision": "float64",
    }
    draw = SAMPLERS.get("dfm")(tmp_path / "model", cfg, corpus, torch.device("cpu"))
    assert draw.counter.nfe == 0 and draw.counter.rows == 0  # the warm-up is not counted
    draw.run(torch.Generator().manual_seed(0))
    assert (draw.counter.nfe, draw.counter.rows) == (3 * n_steps, 5 * n_steps)
    (tmp_path / "stage").mkdir()
    payload = sample_stage(cfg, {"model": str(tmp_path / "model")}, tmp_path / "stage")
    assert payload["metrics"]["nfe"] == n_steps and isinstance(payload["metrics"]["nfe"], int)
    assert len(payload["time_grid"]) == n_steps + 1 and payload["metrics"]["wall_s"] > 0


def test_kinds_claim_the_rules_that_apply_to_them(monkeypatch):
    from fsdfm import samplers
    from fsdfm.methods.base import MixtureRules, declared_rules

    mixture = [k for k in METHOD_KINDS if isinstance(METHOD_KINDS.get(k).rules, MixtureRules)]
    assert mixture  # the DFM family samples the mixture path
    for name in METHOD_KINDS:
        rules = METHOD_KINDS.get(name).rules
        assert rules[0] in rules and len(set(rules)) == len(rules)  # its default is accepted; no rule twice
        if isinstance(rules, MixtureRules):  # every accepted rule of a mixture kind samples (or aliases one that does)
            assert all(callable(samplers.get_rule(rule)) for rule in rules)
    # a rule registered without kinds applies to every mixture kind and to no other; a restricted one only where
    # it says; an opted-out one everywhere but there; no kind file changes
    monkeypatch.setitem(samplers.RULE_KINDS, "new_rule", None)
    monkeypatch.setitem(samplers.RULE_KINDS, "narrow_rule", ("fsdfm",))
    monkeypatch.setitem(samplers.RULE_KINDS, "shy_rule", None)
    monkeypatch.setitem(samplers.RULE_EXCLUDES, "shy_rule", ("dfm",))
    for name in METHOD_KINDS:
        rules = METHOD_KINDS.get(name).rules
        assert ("new_rule" in rules) == (name in mixture)
        assert ("narrow_rule" in rules) == (name == "fsdfm")
        assert ("shy_rule" in rules) == (name in mixture and name != "dfm")
    with pytest.raises(ValueError, match="default rule 'mdlm' does not declare it applies to 'fsdfm'"):
        declared_rules("fsdfm", "mdlm")


@pytest.mark.parametrize("key,value", [("source", "uniform"), ("loss", "gkl"), ("scheduler", {"name": "cosine"})])
def test_mixture_path_settings_are_refused_for_a_kind_that_has_no_path(key, value):
    # AR samples left to right: a source, loss or scheduler would be ignored, so it is an error naming the key
    raw = {
        "name": "x",
        "data": {"kind": "oracle", **{k: v for k, v in ORACLE_DATA.items() if k != "kind"}},
        "evaluator": {"kind": "none"},
        "methods": {"a": {"kind": "ar", "budgets": [16], key: value}},
    }
    with pytest.raises(SpecError, match=rf"methods\.a\.{key}: a ar method does not sample the mixture path"):
        load_spec_dict(raw, "x.yaml", check_files=False)
    raw["methods"] = {"d": {"kind": "dfm", "budgets": [2], key: value}}  # the same setting on a DFM method is fine
    assert getattr(load_spec_dict(raw, "x.yaml", check_files=False)[0].methods["d"], key) is not None
