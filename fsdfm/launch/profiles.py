"""Cluster profiles (slurm/*.yaml): `load_profile`, the resources of one resource class, and their submitit
SLURM parameters; the shell lines that make a job import this very source tree.

Knows the profile format; knows nothing of stages beyond their resource class.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import yaml

from fsdfm.launch.runner import STAGE_MODULES_ENV, stage_modules_env
from fsdfm.registry import did_you_mean
from fsdfm.study.graph import StudyPlan

# the repository root: slurm/ (the profiles) and the fsdfm package live under it
REPO_ROOT = Path(__file__).resolve().parents[2]

# profile keys -> what they mean; mapped to submitit's SlurmExecutor parameters in `slurm_parameters`
PROFILE_KEYS = {
    "partition",
    "timeout_min",
    "cpus_per_task",
    "gpus_per_node",
    "mem_gb",
    "account",
    "qos",
    "constraint",
    "exclude",
    "nodes",
    "tasks_per_node",
    "signal_delay_s",
    "array_parallelism",
    "setup",
    "additional_parameters",
    "max_num_timeout",
    "comment",
}
PROFILE_SECTIONS = {"name", "description", "executor", "defaults", "resources"}
DEFAULT_TIMEOUT_MIN = 60
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # the local default (2 min) would kill any real stage


def _check_keys(d: dict, where: str) -> None:
    for k in d:
        if k not in PROFILE_KEYS:
            raise ValueError(
                f"{where}: unknown key {k!r}{did_you_mean(k, sorted(PROFILE_KEYS))}; "
                f"allowed: {', '.join(sorted(PROFILE_KEYS))}"
            )


def load_profile(profile: str | os.PathLike | dict | None, overrides: dict | None = None) -> dict:
    """A cluster profile: {"defaults": {...}, "resources": {class: {...}}} with `overrides` applied.

    `profile` is a dict, a YAML path, or a name under slurm/ ("local" -> slurm/local.yaml). `overrides` are
    CLI-style: "timeout_min": 30 applies to every resource class; "gpu.timeout_min": 120 (or
    "resources.gpu.timeout_min") to one. Unknown keys are errors naming the file and the allowed keys."""
    if profile is None:
        prof, where = {}, "<no profile>"
    elif isinstance(profile, dict):
        prof, where = copy.deepcopy(profile), "<profile dict>"
    else:
        path = Path(profile)
        if not path.exists() and path.suffix == "" and len(path.parts) == 1:
            path = REPO_ROOT / "slurm" / f"{profile}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"cluster profile {profile!r} not found (looked for {path})")
        prof, where = yaml.safe_load(path.read_text()) or {}, str(path)
    if not isinstance(prof, dict):
        raise ValueError(f"{where}: a cluster profile is a mapping with 'defaults' and 'resources'")
    for k in prof:
        if k not in PROFILE_SECTIONS:
            raise ValueError(
                f"{where}: unknown section {k!r}{did_you_mean(k, sorted(PROFILE_SECTIONS))}; "
                f"allowed: {', '.join(sorted(PROFILE_SECTIONS))}"
            )
    prof.setdefault("defaults", {})
    prof.setdefault("resources", {})
    _check_keys(prof["defaults"] or {}, f"{where}: defaults")
    for cls, params in prof["resources"].items():
        _check_keys(params or {}, f"{where}: resources.{cls}")
        prof["resources"][cls] = params or {}
    prof["overrides"] = {}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if parts[0] == "resources":
            parts = parts[1:]
        if len(parts) == 1:
            _check_keys({parts[0]: value}, f"override {key!r}")
            prof["overrides"][parts[0]] = value
        elif len(parts) == 2:
            _check_keys({parts[1]: value}, f"override {key!r}")
            prof["resources"].setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ValueError(f"override {key!r}: expected KEY or CLASS.KEY")
    prof["where"] = where
    return prof


def resources_for(profile: dict, resource_class: str) -> dict:
    """The merged parameters of one resource class: defaults < resources[class] < plain overrides.

    A class the profile does not list is an error, except "cpu", which falls back to the defaults (a GPU
    stage must never silently land on a CPU partition)."""
    classes = profile.get("resources", {})
    if resource_class not in classes and resource_class != "cpu":
        raise ValueError(
            f"{profile.get('where', 'cluster profile')}: no resources.{resource_class} for stages "
            f"that need {resource_class!r}; profile has: {', '.join(sorted(classes)) or 'none'}"
        )
    return {**profile.get("defaults", {}), **classes.get(resource_class, {}), **profile.get("overrides", {})}


def slurm_parameters(res: dict) -> dict:
    """Profile keys -> submitit SlurmExecutor parameters."""
    p = {k: v for k, v in res.items() if k not in ("timeout_min", "mem_gb", "tasks_per_node", "max_num_timeout")}
    p["time"] = int(res.get("timeout_min", DEFAULT_TIMEOUT_MIN))
    if "mem_gb" in res:
        mem = float(res["mem_gb"])
        p["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if "tasks_per_node" in res:
        p["ntasks_per_node"] = res["tasks_per_node"]
    return p


def source_setup(plan: StudyPlan | None = None) -> list[str]:
    """Shell lines that make a job import this very fsdfm source tree (provenance: the commit we record) and
    grant it the modules of `plan`'s stage kinds that live outside fsdfm (`stage_modules_env`)."""
    root = str(REPO_ROOT)
    lines = [f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    granted = stage_modules_env([s.kind for s in plan.stages.values()]) if plan is not None else {}
    if granted:
        lines.append(f"export {STAGE_MODULES_ENV}={shlex.quote(json.dumps(granted, sort_keys=True))}")
    return lines
