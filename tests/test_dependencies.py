"""Dependency floors in pyproject.toml are what the test suite runs with: every installed version meets its floor,
on the floor's major version (a major bump is what breaks: transformers 4.x cannot load evaluators 5.x saves)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith(project["name"])]
    return reqs


def test_every_floor_is_met_on_its_major_version():
    reqs = requirements()
    assert len(reqs) >= 15
    for req in reqs:
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert floors, f"{req}: no >= floor"
        installed = Version(importlib.metadata.version(req.name))
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is below {req}"
        assert installed.major == floors[0].major, f"{req.name}: tested with {installed}, floor {floors[0]}"


def test_transformers_floor_can_load_what_the_suite_saves():
    (req,) = [r for r in requirements() if r.name == "transformers"]
    assert min(Version(s.version) for s in req.specifier if s.operator == ">=") >= Version("5")
