"""Relative paths in a spec resolve against the spec file's folder, not the working directory.

Fields: data.train and data.valid (kinds text and tokens), data.oracle.{transition,emission,initial} (kind oracle),
data.tokenizer (a tokenizer.json or a folder holding
one), evaluator.name (an hf evaluator saved in a local folder), cluster.profile and methods.*.checkpoint.path.

    value absolute                      -> kept
    SPEC_DIR/value exists               -> that file, written relative to the working directory (absolute
                                           when it lies outside it)
    value exists (cwd-relative, as before this rule) and SPEC_DIR/value does not
                                        -> kept, with a FutureWarning (move the path into the spec's frame)
    neither exists                      -> SPEC_DIR/value for data.train/valid and checkpoint.path (so the
                                           "file not found" message names where it was looked for); names such
                                           as "bpe", "gpt2" or "gpt2-large" are kept

The resolved path is written relative to the working directory because the stage configs (and so the stage ids)
hold it, as they always have: run from the repository root, `../data/tinystories/train.txt` in
experiments/demo.yaml becomes `data/tinystories/train.txt`, the very string (and stage ids) of before.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

# (dotted path, must it be a file path?) -- names such as tokenizer "bpe" or evaluator "gpt2" are not paths
_DATA_FILE_KINDS = ("text", "tokens")
ORACLE_FILE_FIELDS = ("transition", "emission", "initial")  # data.oracle files of sources markov_file / hmm_file


def _frame(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.abspath(path)


def _resolve(value: Any, spec_dir: Path, where: str, file: str, is_path: bool) -> Any:
    if not isinstance(value, str) or not value or "\0" in value or os.path.isabs(value):
        return value
    candidate = spec_dir / value
    if candidate.exists():
        return _frame(candidate) if spec_dir != Path(".") else value
    if Path(value).exists():
        warnings.warn(
            f"{file}: {where}: {value!r} is read relative to the working directory; spec paths resolve "
            f"against the spec's folder ({spec_dir}/{value} does not exist): write it relative to "
            "the spec file",
            FutureWarning,
            stacklevel=2,
        )
        return value
    return _frame(candidate) if is_path else value


def resolve_paths(raw: dict, spec_dir: Path, file: str) -> dict:
    """A copy of one cell's spec mapping with its relative paths resolved against `spec_dir` (module docstring)."""
    out = copy.deepcopy(raw)
    spec_dir = Path(spec_dir)
    data = out.get("data")
    if isinstance(data, dict):
        kind = data.get("kind", "text")
        for key in ("train", "valid"):
            if kind in _DATA_FILE_KINDS and key in data:
                data[key] = _resolve(data[key], spec_dir, f"data.{key}", file, is_path=True)
        oracle = data.get("oracle")
        if kind == "oracle" and isinstance(oracle, dict):  # a user's own chain / HMM (fsdfm.data.oracle.files)
            for key in ORACLE_FILE_FIELDS:
                if isinstance(oracle.get(key), str):
                    oracle[key] = _resolve(oracle[key], spec_dir, f"data.oracle.{key}", file, is_path=True)
        if data.get("tokenizer") not in (None, "bpe", "gpt2", "none"):
            data["tokenizer"] = _resolve(data["tokenizer"], spec_dir, "data.tokenizer", file, is_path=False)
    ev = out.get("evaluator")
    if isinstance(ev, dict) and ev.get("kind") == "hf" and "name" in ev:
        ev["name"] = _resolve(ev["name"], spec_dir, "evaluator.name", file, is_path=False)
    cluster = out.get("cluster")
    if isinstance(cluster, dict) and "profile" in cluster:
        cluster["profile"] = _resolve(cluster["profile"], spec_dir, "cluster.profile", file, is_path=False)
    methods = out.get("methods")
    if isinstance(methods, dict):
        for name, m in methods.items():
            ckpt = m.get("checkpoint") if isinstance(m, dict) else None
            if isinstance(ckpt, dict) and "path" in ckpt:
                ckpt["path"] = _resolve(ckpt["path"], spec_dir, f"methods.{name}.checkpoint.path", file, is_path=True)
    return out
