"""What decides a stage's result besides its config and its inputs: code versions and data content.

    fingerprint(kind, config) = {
        "version": STAGE_KINDS[kind].version,
        "metrics": {m: METRICS[m].version for m in STAGE_KINDS[kind].metric_names(config)},   (when any)
        "data":    {field: "sha256:<hex>" for each file config["data"] names},                   (when any)
    }

It enters the stage id (`fsdfm.study.graph.stage_id`), so

* a fix to a stage kind (its version bumped) re-runs the stages of that kind and their dependents;
* a fix to a metric re-runs only the stages that compute it (the evaluate stages whose `metrics.names` list it,
  or the kind that records it), nothing upstream;
* a changed data file re-runs exactly the stages whose config reads it (through their `data` key).

Versions are declared strings, not hashes of the source: a hash of the computing modules would re-run a 5 GB
training for a comment or a refactor of a shared module, and would still miss behaviour that lives elsewhere
(a library upgrade). A declared version is bumped on purpose; `fsdfm.versions` and tests/test_versions.py keep
that honest by failing when a unit's sources change while its version does not.

Data files are hashed with the memoised `fsdfm.io.sha256_file` the loader uses too (once per process). Fields
that name no file (a hub split such as "train[-1000:]", a tokenizer name such as "gpt2", an oracle source)
add nothing: their config values already identify them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsdfm.io import sha256_file
from fsdfm.study.graph import STAGE_KINDS, Stage

DATA_FILE_FIELDS = ("train", "valid", "tokenizer")
ORACLE_FILE_FIELDS = ("transition", "emission", "initial")


def data_fingerprint(data: dict) -> dict[str, str]:
    """{field: "sha256:<hex>"} of each of `data`'s train/valid/tokenizer values that names a file (a tokenizer
    directory counts through its tokenizer.json), read relative to the working directory as the loader does."""
    out = {}
    for key in DATA_FILE_FIELDS:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue
        p = Path(value)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        if p.is_file():
            out[key] = "sha256:" + sha256_file(p)
    oracle = data.get("oracle")
    if isinstance(oracle, dict):  # a user's own chain / HMM from .npy files (fsdfm.data.oracle.files)
        for key in ORACLE_FILE_FIELDS:
            value = oracle.get(key)
            if isinstance(value, str) and value and Path(value).is_file():
                out[f"oracle.{key}"] = "sha256:" + sha256_file(Path(value))
    return out


def stage_fingerprint(kind: str, config: dict) -> dict[str, Any]:
    """The fingerprint of a stage of registered kind `kind` with `config` (see the module docstring)."""
    from fsdfm.metrics.registry import METRICS  # heavy: torch

    k = STAGE_KINDS.get(kind)
    fp: dict[str, Any] = {"version": k.version}
    names = k.metric_names(config)
    if names:
        fp["metrics"] = {n: METRICS.get(n).version for n in names}
    data = config.get("data")
    if isinstance(data, dict):
        files = data_fingerprint(data)
        if files:
            fp["data"] = files
    return fp


def with_fingerprint(stage: Stage) -> Stage:
    """`stage` with its fingerprint filled in (a new Stage, so a new id)."""
    return Stage(stage.kind, stage.config, stage.inputs, stage_fingerprint(stage.kind, stage.config))


class DataChangedError(RuntimeError):
    """A data file a stage reads no longer has the content its stage id was planned with."""


def check_data_unchanged(stage: Stage) -> dict[str, str]:
    """Re-hash the data files `stage` reads and compare them with the digests in its fingerprint (its id).

    A SLURM job may start hours after its plan was made; if a file changed meanwhile, the stage would train on
    the new content under the old content's id. Raises `DataChangedError` naming the file, both digests and
    what to do; returns {field: "sha256:<hex>"} of what was checked (what the stage reads)."""
    planned = (stage.fingerprint or {}).get("data") or {}
    if not planned:
        return {}
    data = stage.config.get("data") if isinstance(stage.config, dict) else None
    now = data_fingerprint(data) if isinstance(data, dict) else {}
    for field, want in sorted(planned.items()):
        got = now.get(field)
        if got != want:
            src = (data or {}).get(field)
            state = f"now {got[:19]}" if got else "now missing"
            raise DataChangedError(
                f"data.{field} {src}: changed since this study was planned (planned {str(want)[:19]}, {state}); "
                "this stage's id holds the old content, so it will not run on the new one. Re-run `fsdfm run "
                "SPEC`: the plan is made again and the stages that read the file get new ids"
            )
    return dict(planned)
