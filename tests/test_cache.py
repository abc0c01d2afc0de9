"""Every cache path is absolute and fixed: the same folder whatever the working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fsdfm.records import data_cache_dir, default_cache_dir, pin_cache_env, results_root_of, stage_cache_dir
from fsdfm.methods.common import cache_dir


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A results root with one study (plan.json beside stages/) and one stage folder."""
    monkeypatch.delenv("FSDFM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "results"
    stage = root / "study" / "stages" / "sample-abc"
    stage.mkdir(parents=True)
    (root / "study" / "plan.json").write_text(json.dumps({"name": "study", "stages": {}, "runs": []}))
    return tmp_path, root, stage


def test_a_stage_caches_under_its_results_root_from_any_working_directory(layout, monkeypatch):
    tmp, root, stage = layout
    seen = set()
    for cwd in (tmp, root, stage, Path("/")):
        monkeypatch.chdir(cwd)
        seen.add(cache_dir(stage))  # an absolute stage folder
        seen.add(cache_dir(Path(os.path.relpath(stage, cwd))))  # the same folder, relative to this cwd
    assert seen == {root / ".cache"}
    assert results_root_of(stage) == root
    # the shared store's own folder (what the study's stages/<id> link points to) has the same root
    (root / "_stages" / "sample-abc").mkdir(parents=True)
    assert cache_dir(root / "_stages" / "sample-abc") == root / ".cache"


def test_a_folder_outside_a_results_root_uses_the_user_cache_never_slash_dot_cache(layout, monkeypatch):
    tmp, root, stage = layout
    monkeypatch.chdir("/")
    for shallow in (Path("/tmp/x"), Path("x"), tmp / "a" / "b" / "c"):  # parents[2] of /tmp/x was "/"
        assert stage_cache_dir(shallow) == default_cache_dir() == tmp / "xdg" / "fsdfm"
    fake = tmp / "other" / "stages" / "x"  # a stages/ folder without a plan.json is not a study
    fake.mkdir(parents=True)
    assert results_root_of(fake) is None


def test_fsdfm_cache_wins_and_is_pinned_absolute(layout, monkeypatch):
    tmp, root, stage = layout
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("FSDFM_CACHE", "shared-cache")
    pin_cache_env()
    assert os.environ["FSDFM_CACHE"] == str(tmp / "shared-cache")
    monkeypatch.chdir("/")  # a job in another directory sees the same folder
    assert cache_dir(stage) == data_cache_dir(root) == data_cache_dir("anything") == tmp / "shared-cache"


def test_the_cli_checks_specs_against_the_absolute_cache_of_the_results_root(layout, monkeypatch):
    tmp, root, stage = layout
    monkeypatch.chdir(tmp)
    assert data_cache_dir("results") == root / ".cache"
    assert data_cache_dir("results").is_absolute()
