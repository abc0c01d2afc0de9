"""Spec paths resolve against the spec file's folder (fsdfm/study/paths.py), so a spec works from any directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fsdfm.methods import plan_study
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec

REPO = Path(__file__).resolve().parents[1]


def test_shipped_demo_loads_from_any_directory_with_the_ids_of_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, cells = load_spec("experiments/demo.yaml", check_files=False)
    # from the repository root the stage configs hold the very strings the ids always held
    assert (spec.data.train, spec.data.valid) == ("data/tinystories/train.txt", "data/tinystories/valid.txt")
    ids = set(plan_study(spec.name, cells).stages)
    monkeypatch.chdir(tmp_path)
    spec2, cells2 = load_spec(REPO / "experiments" / "demo.yaml")  # with the data checks
    assert Path(spec2.data.train) == REPO / "data" / "tinystories" / "train.txt"  # outside the cwd: absolute
    assert Path(spec2.data.train).is_file()
    assert len(plan_study(spec2.name, cells2).stages) == len(ids)


def test_paths_below_the_spec_folder_and_the_cwd_fallback(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    (folder / "corpus").mkdir(parents=True)
    text = (REPO / "data" / "tinystories" / "valid.txt").read_text()[:20000]
    for name in ("train.txt", "valid.txt"):
        (folder / "corpus" / name).write_text(text)
    raw = {
        "name": "p",
        "data": {"kind": "text", "train": "corpus/train.txt", "valid": "corpus/valid.txt", "seq_len": 16},
        "cluster": {"profile": "my-cluster.yaml"},
        "methods": {"dfm": {"kind": "dfm", "budgets": [1]}},
    }
    (folder / "my-cluster.yaml").write_text("name: c\n")
    (folder / "s.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    spec, _ = load_spec("study/s.yaml", check_files=False)
    assert spec.data.train == os.path.join("study", "corpus", "train.txt")  # below the cwd: relative to it
    assert spec.cluster["profile"] == os.path.join("study", "my-cluster.yaml")
    # a path that exists only relative to the working directory still works, with a warning to move it
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "other.txt").write_text(text)
    (folder / "t.yaml").write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "train": "corpus/other.txt"}}))
    with pytest.warns(FutureWarning, match="relative to the working directory"):
        spec, _ = load_spec("study/t.yaml", check_files=False)
    assert spec.data.train == "corpus/other.txt"
    # a missing file is named where it was looked for
    (folder / "u.yaml").write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "train": "corpus/none.txt"}}))
    with pytest.raises(SpecError, match=r"data.train: file not found: study/corpus/none.txt"):
        load_spec("study/u.yaml", check_files=False)
    # names that are not paths stay names
    (folder / "v.yaml").write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "tokenizer": "bpe"}}))
    assert load_spec("study/v.yaml", check_files=False)[0].data.tokenizer == "bpe"
