"""Stage fingerprints: data file hashes and code versions enter the ids of exactly the stages they concern."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from fsdfm.cli import main
from fsdfm.fingerprint import data_fingerprint, stage_fingerprint
from fsdfm.methods import plan_study
from fsdfm.metrics.registry import METRICS
from fsdfm.methods.load import load_spec
from fsdfm.study.graph import STAGE_KINDS, Stage

TEXT = "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n" * 20

SPEC = """
name: fp_study
data: {{kind: text, train: {train}, valid: {a}, tokenizer: bpe, vocab_size: 300, seq_len: 16}}
model: {{preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}}
sampling: {{n_samples: 4, batch_size: 4, seed: 0}}
evaluator: {{kind: reference, train: {{steps: 2, batch_size: 4}}}}
methods:
  dfm: {{kind: dfm, train: {{steps: 2, batch_size: 4}}, rules: [euler], budgets: [1, 2]}}
  fs: {{kind: fsdfm, teacher: dfm, train: {{steps: 2, batch_size: 4}}, budgets: [1]}}
grid:
  data.valid: [{a}, {b}]
metrics:
  names: [entropy_nats, distinct_2, gen_ppl]
"""


@pytest.fixture
def files(tmp_path):
    paths = {name: tmp_path / f"{name}.txt" for name in ("train", "a", "b")}
    for name, p in paths.items():
        p.write_text(TEXT + name)
    spec = tmp_path / "fp_study.yaml"
    spec.write_text(SPEC.format(**{k: str(v) for k, v in paths.items()}))
    return spec, paths


def plan_of(spec):
    s, cells = load_spec(spec)
    return plan_study(s.name, cells)


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01  # same size: only the content hash can tell
    path.write_bytes(bytes(data))


def test_data_fingerprint_is_the_sha256_of_each_named_file(files):
    spec, paths = files
    want = "sha256:" + hashlib.sha256(paths["a"].read_bytes()).hexdigest()
    fp = data_fingerprint({"kind": "text", "train": str(paths["train"]), "valid": str(paths["a"]), "tokenizer": "bpe"})
    assert fp == {"train": "sha256:" + hashlib.sha256(paths["train"].read_bytes()).hexdigest(), "valid": want}
    # names that are no file (a hub split, a tokenizer name) add nothing
    assert data_fingerprint({"kind": "hf", "train": "train[-100:]", "tokenizer": "gpt2"}) == {}


def test_changing_one_byte_of_a_data_file_changes_exactly_the_stages_that_read_it(files):
    spec, paths = files
    before = plan_of(spec)
    reads_a = {sid for sid, s in before.stages.items() if s.config["data"]["valid"] == str(paths["a"])}
    assert 0 < len(reads_a) < len(before.stages)
    flip_one_byte(paths["a"])
    after = plan_of(spec)
    assert len(after.stages) == len(before.stages)
    assert set(before.stages) - set(after.stages) == reads_a  # every stage reading a.txt has a new id ...
    assert {sid for sid, s in after.stages.items() if s.config["data"]["valid"] == str(paths["b"])} == set(
        before.stages
    ) - reads_a  # ... and nothing else changed
    flip_one_byte(paths["train"])  # every stage reads train.txt
    assert set(plan_of(spec).stages).isdisjoint(after.stages)


def test_dry_run_shows_the_data_hashes(files, tmp_path, capsys):
    spec, paths = files
    assert main(["--results", str(tmp_path / "results"), "run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    digest = hashlib.sha256(paths["b"].read_bytes()).hexdigest()
    assert f"valid={paths['b']}" in out and digest[:12] in out
    assert res["data"][f"valid={paths['b']}"] == "sha256:" + digest
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_a_metric_version_enters_only_the_ids_of_stages_that_compute_it(files, monkeypatch):
    spec, _ = files
    before = plan_of(spec)
    monkeypatch.setitem(METRICS._items, "gen_ppl", dataclasses.replace(METRICS.get("gen_ppl"), version="2"))
    after = plan_of(spec)
    gone = set(before.stages) - set(after.stages)
    assert gone and {before.stages[s].kind for s in gone} == {"evaluate", "evaluate_data"}
    assert {s.kind for s in after.stages.values() if s.id not in before.stages} == {"evaluate", "evaluate_data"}


def test_a_stage_kind_version_changes_its_stages_and_their_dependents_only(files, monkeypatch):
    spec, _ = files
    before = plan_of(spec)
    monkeypatch.setitem(STAGE_KINDS._items, "sample", dataclasses.replace(STAGE_KINDS.get("sample"), version="2"))
    after = plan_of(spec)
    assert {before.stages[s].kind for s in set(before.stages) - set(after.stages)} == {"sample", "evaluate"}


def test_fingerprint_lists_the_kind_version_and_the_metrics_it_computes():
    cfg = {"metrics": {"names": ["distinct_2", "entropy_nats"]}, "data": {"kind": "oracle"}}
    fp = stage_fingerprint("evaluate", cfg)
    assert fp["version"] == STAGE_KINDS.get("evaluate").version
    assert set(fp["metrics"]) == {
        "distinct_2",
        "entropy_nats",
        "oracle_nll",
        "oracle_expected_nll",
        "oracle_entropy_rate",
        "ngram_tv",
        "ngram_kl",
        "ngram_tv_floor",
        "ngram_kl_floor",
    }
    assert "data" not in fp  # an oracle source names no file
    assert set(stage_fingerprint("sample", {"data": {}})["metrics"]) == {"nfe", "wall_s", "tokens_per_s", "peak_mem"}
    # a stage's id sees its fingerprint; its config (what the stage function gets) does not
    s1, s2 = (
        Stage("sample", {"a": 1}, fingerprint={"version": "1"}),
        Stage("sample", {"a": 1}, fingerprint={"version": "2"}),
    )
    assert s1.id != s2.id and s1.config == s2.config
    assert Stage.from_dict(s1.to_dict()).id == s1.id
