"""The Python API: run_study is `fsdfm run` + `fsdfm.records.load`; load_model(...).sample reproduces the study's own
sample stage; evaluate reproduces its evaluate stage; importing fsdfm stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import fsdfm
from fsdfm.cli import main
from fsdfm.records import load, load_records, read_record
from fsdfm.study.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n"
    "A little dog ran to the park. It saw a big red ball and it was happy.\n\n"
) * 12
# provenance and timings: they differ between two runs of the same plan, nothing else may
VOLATILE = {
    "end_time",
    "stage_wall_s",
    "wall_s",
    "tokens_per_s",
    "peak_mem",
    "host",
    "threads",
    "cpu_s",
    "load_per_core",
}  # peak_mem: RSS on CPU


def spec_dict(tmp: Path, sampling_seed: int) -> dict:
    return {
        "name": "api_tiny",
        "data": {
            "kind": "text",
            "train": str(tmp / "train.txt"),
            "valid": str(tmp / "valid.txt"),
            "tokenizer": "bpe",
            "vocab_size": 300,
            "seq_len": 16,
        },
        "model": {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2},
        "sampling": {"n_samples": 4, "batch_size": 3, "seed": sampling_seed},
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "methods": {
            "dfm": {
                "kind": "dfm",
                "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1},
                "rules": ["euler"],
                "budgets": [2],
            },
            "fs": {
                "kind": "fsdfm",
                "teacher": "dfm",
                "distill": {"K": 3},
                "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
                "budgets": [8],
            },
            "ar": {"kind": "ar", "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1}, "budgets": [16]},
            "flm": {"kind": "flm", "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1}, "budgets": [4]},
        },
        "metrics": {"names": ["entropy_nats", "distinct_2", "rep_n"]},
    }


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The same study run twice: `fsdfm run` on the YAML (root a), and run_study on a dict with an override (root b)."""
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "valid.txt").write_text(TEXT[::-1].replace("\n\n", " . \n\n"))
    (tmp / "api_tiny.yaml").write_text(
        yaml.safe_dump(spec_dict(tmp, sampling_seed=7), sort_keys=False)
    )  # same method order
    assert main(["--results", str(tmp / "a"), "run", str(tmp / "api_tiny.yaml"), "--executor", "inline"]) == 0
    df_b = fsdfm.run_study(
        spec_dict(tmp, sampling_seed=0), overrides={"sampling.seed": 7}, executor="debug", results=tmp / "b"
    )
    return tmp, df_b


@pytest.mark.slow  # runs a tiny study (module fixture): ~1 min on 2 busy cores
def test_run_study_returns_the_dataframe_of_fsdfm_run_and_load(studies):
    tmp, df_b = studies
    df_a = load(tmp / "a" / "api_tiny")
    assert len(df_a) == 4 and sorted(df_a.method) == ["ar", "dfm", "flm", "fs"]
    keep = [c for c in df_a.columns if c not in VOLATILE | {"study"}]
    assert list(df_b.columns) == list(df_a.columns)
    # the override names the study as `fsdfm run SPEC sampling.seed=7` would (issue 24: it was api_tiny, the file's)
    assert set(df_b.study) == {"api_tiny+sampling.seed-7"} and set(df_a.study) == {"api_tiny"}
    pd.testing.assert_frame_equal(df_b[keep].reset_index(drop=True), df_a[keep].reset_index(drop=True))
    # equal stage ids: the override sampling.seed=7 gave the plan of the YAML that says 7
    assert list(df_b.stage_id) == list(df_a.stage_id)
    for root in ("a", "b"):  # the data cache is the results root's, whatever the working directory
        assert (tmp / root / ".cache" / "tokenizers").is_dir()
    # on a finished study run_study runs nothing and returns exactly what fsdfm.records.load reads
    again = fsdfm.run_study(tmp / "api_tiny.yaml", executor="debug", results=tmp / "a")
    pd.testing.assert_frame_equal(again, load(tmp / "a" / "api_tiny"))


@pytest.mark.slow  # runs a tiny study (module fixture): ~1 min on 2 busy cores
def test_a_bad_override_is_a_spec_error_naming_it(studies):
    tmp, _ = studies
    with pytest.raises(
        SpecError, match=r"override methods\.fs\.distil\.K=4: unknown key methods\.fs\.distil \(did you mean 'distill'"
    ):
        fsdfm.run_study(spec_dict(tmp, 7), overrides={"methods.fs.distil.K": 4}, results=tmp / "c")
    assert not (tmp / "c").exists()  # nothing written


def _sample_stage(root: Path, method: str) -> dict:
    df = load(root / "api_tiny")
    ev = read_record(root / "api_tiny" / "stages" / df[df.method == method].stage_id.item())
    return read_record(root / "api_tiny" / "stages" / ev["inputs"]["samples"])


@pytest.mark.slow  # runs a tiny study (module fixture): ~1 min on 2 busy cores
@pytest.mark.parametrize("method", ["fs", "dfm", "ar", "flm"])
def test_load_model_sample_reproduces_the_studys_own_sample_stage(studies, method):
    tmp, _ = studies
    rec = _sample_stage(tmp / "a", method)
    cfg = rec["config"]
    model_dir = tmp / "a" / "api_tiny" / "stages" / rec["inputs"]["model"]
    assert (model_dir / "tokenizer.json").is_file()  # saved beside the checkpoint: the folder is self-contained
    m = fsdfm.load_model(model_dir)
    assert (m.seq_len, m.t_end, m.sampler) == (16, cfg["t_end"], cfg["sampler"])
    s = m.sample(cfg["n_samples"], steps=cfg["steps"], rule=cfg["rule"], seed=cfg["seed"], batch_size=cfg["batch_size"])
    stage = tmp / "a" / "api_tiny" / "stages" / rec["stage_id"]
    np.testing.assert_array_equal(s.tokens, np.load(stage / "samples.npy"))
    assert s.texts == [json.loads(line)["text"] for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert (s.steps, s.nfe, s.seed) == (cfg["steps"], rec["payload"]["metrics"]["nfe"], cfg["seed"])
    other = m.sample(
        cfg["n_samples"], steps=cfg["steps"], rule=cfg["rule"], seed=cfg["seed"] + 1, batch_size=cfg["batch_size"]
    )
    assert not np.array_equal(other.tokens, s.tokens)  # the seed is what made them equal


@pytest.mark.slow  # runs a tiny study (module fixture): ~1 min on 2 busy cores
def test_evaluate_reproduces_the_evaluate_stage(studies):
    tmp, _ = studies
    root = tmp / "a" / "api_tiny"
    rec = next(r for r in load_records(root, kind="evaluate") if r["inputs"]["samples"].startswith("sample-"))
    sample_rec = read_record(root / "stages" / rec["inputs"]["samples"])
    m = fsdfm.load_model(root / "stages" / sample_rec["inputs"]["model"])
    ids = np.load(root / "stages" / rec["inputs"]["samples"] / "samples.npy")
    got = fsdfm.evaluate(ids, metrics=["entropy_nats", "distinct_2", "rep_n"], tokenizer=m)
    for name in ("entropy_nats", "distinct_2", "rep_n"):
        assert got.values[name] == rec["payload"]["metrics"][name]
    assert got.n_samples["entropy_nats"] == 4
    # texts are encoded with the tokenizer and padded with EOS to the longest (sampled ids do not survive a
    # decode/encode round trip: BPE re-encodes canonically, so external texts are scored on their own encoding)
    texts = ["The cat sat on a mat.", "A little dog ran to the park and saw a ball."]
    enc = [m.tokenizer.encode(t) for t in texts]
    padded = np.array([e + [m.tokenizer.eos_id] * (max(map(len, enc)) - len(e)) for e in enc])
    by_text = fsdfm.evaluate(texts, metrics=["distinct_2", "rep_n"], tokenizer=m).values
    assert by_text == fsdfm.evaluate(padded, metrics=["distinct_2", "rep_n"]).values
    with pytest.raises(ValueError, match="tokenizer"):
        fsdfm.evaluate(texts, metrics=["distinct_2"])


@pytest.mark.slow  # runs a tiny study (module fixture): ~1 min on 2 busy cores
def test_load_model_refuses_a_folder_without_a_model(studies):
    tmp, _ = studies
    ev = next(iter(load_records(tmp / "a" / "api_tiny", kind="evaluate")))
    with pytest.raises(ValueError, match="holds no model"):
        fsdfm.load_model(ev["stage_dir"])
    with pytest.raises(FileNotFoundError, match="no such stage folder"):
        fsdfm.load_model(tmp / "nope")


def test_import_fsdfm_is_cheap_and_exports_the_api_lazily():
    code = (
        "import sys, fsdfm; heavy = [m for m in ('torch', 'pandas', 'numpy', 'yaml') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(fsdfm.run_study) and callable(fsdfm.load_model); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-1000:]


def test_package_faces_export_what_their_all_names():
    """Every name of the package faces' `__all__` resolves, and fsdfm's lazy names are the defining modules' objects."""
    import importlib

    import fsdfm.metrics
    import fsdfm.report

    for mod in (fsdfm, fsdfm.metrics, fsdfm.report):
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert not missing, (mod.__name__, missing)
    assert fsdfm.compute_metrics is importlib.import_module("fsdfm.metrics.compute").compute_metrics
    assert fsdfm.register_metric is importlib.import_module("fsdfm.metrics.registry").register_metric
    assert fsdfm.write_report is importlib.import_module("fsdfm.report").write_report
    assert set(fsdfm.__all__) >= {
        "run_study",
        "load_model",
        "evaluate",
        "compute_metrics",
        "register_metric",
        "METRICS",
        "write_report",
        "load_study",
    }


ORACLE_SPEC = """
name: api_name
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
  names: [entropy_nats, rep_n]
"""


def test_the_api_and_the_cli_name_a_study_alike(tmp_path, capsys):
    """Issue 24: run_study(spec, overrides={"sampling.n_samples": 8}) resolved to results/<name>, where `fsdfm run`
    writes <name>+sampling.n_samples-8 (and the API had no limit=): one rule now, the same folder and stages."""
    spec = tmp_path / "s.yaml"
    spec.write_text(ORACLE_SPEC)
    root = tmp_path / "r"
    over = {"sampling.n_samples": 2, "seed": 3}
    df = fsdfm.run_study(spec, overrides=over, limit=2, executor="debug", results=root)
    want = root / "api_name+limit-2+sampling.n_samples-2+seed-3"
    assert fsdfm.study_path(spec, over, limit=2, results=root) == want and want.is_dir()
    assert set(df.study) == {want.name}
    assert not (root / "api_name").exists()  # the file's own study is untouched
    capsys.readouterr()
    args = ["--results", str(root), "run", str(spec), "sampling.n_samples=2", "seed=3", "--limit", "2", "--dry-run"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["study"] == want.name and out["done"] == out["stages"]  # the API's folder, every stage done there
    # a spec given as a mapping names its study by the same rule
    assert fsdfm.study_path(yaml.safe_load(ORACLE_SPEC), over, limit=2, results=root) == want
