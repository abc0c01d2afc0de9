"""Loading a study: a spec file or mapping, with overrides and --limit, validated and expanded into grid cells.

The top of fsdfm.study: it reads (yaml_io), applies overrides (overrides), expands the grid (grid), resolves
relative paths (paths), validates each cell (spec) and checks the data files (fsdfm.data.preflight). Nothing is
written. Knows no method kind: the checks that need the kinds come in as `checks` (fsdfm.methods.load passes
them; without them a spec is checked against the shared schema only).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fsdfm.study.grid import cell_raw, grid_cells
from fsdfm.study.overrides import apply_overrides as _apply, format_override, limit_overrides, study_name
from fsdfm.study.paths import resolve_paths
from fsdfm.study.spec import Cell, StudySpec, build_study
from fsdfm.study.yaml_io import SpecError, check_name, expanded_size, read_yaml, short, short_message


def check_data(spec: StudySpec, file: str, cache_dir: str | Path | None) -> None:
    """The data and the evaluator as far as they can be checked cheaply and without writing: files, sizes, token
    ids, vocabularies, corpus length (fsdfm.data.preflight), an hf evaluator present offline, and the MiniLM
    files of the MAUVE featurizer."""
    from fsdfm.data.preflight import PreflightError, preflight  # heavy: torch

    try:
        preflight(spec.data, Path(cache_dir) if cache_dir is not None else None)
    except PreflightError as e:
        raise SpecError(f"{file}: data.{e.key}: {short_message(e)}") from None
    if "mauve" in spec.metrics.names and spec.metrics.mauve_featurizer == "minilm":
        from fsdfm.metrics import mauve  # heavy: torch

        try:
            mauve.minilm_model_dir()
        except RuntimeError as e:
            raise SpecError(f"{file}: metrics.mauve_featurizer: {short_message(e)}") from None
    if spec.evaluator.kind == "hf":
        from fsdfm.metrics.evaluator import EvaluatorError, check_evaluator_available  # heavy: torch

        try:
            check_evaluator_available(spec.evaluator.name)
        except EvaluatorError as e:
            raise SpecError(f"{file}: evaluator.name: {short_message(e)}") from None


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | None, file: str) -> dict:
    """A copy of the raw spec mapping with each dotted override `key: value` written into it (before validation,
    so an overridden spec is checked exactly like a YAML file): `fsdfm.study.overrides.apply_overrides`, which checks
    each key against the spec's fields ("did you mean") and treats `grid.KEY` as one grid axis. None: a copy."""
    if not overrides:
        return copy.deepcopy(raw)
    out = _apply(raw, overrides, file)
    expanded_size(out, file)
    return out


def _naming_overrides(e: SpecError, overrides: Mapping[str, Any] | None) -> SpecError:
    """The error of a spec validated after overrides, naming the override(s) whose keys it mentions."""
    text = str(e)

    def mentioned(key: str) -> bool:  # the key, or a prefix of it an "unknown key" message stops at, as a whole path
        parts = key.split(".")
        return any(
            re.search(r"(?<![\w.])" + re.escape(".".join(parts[:n])) + r"(?![\w])", text)
            for n in range(len(parts), min(2, len(parts)) - 1, -1)
        )

    named = [k for k in (overrides or {}) if isinstance(k, str) and mentioned(k)]
    if not named:
        return e
    return SpecError(text + " (set by override " + ", ".join(f"{k}={short(overrides[k], 60)}" for k in named) + ")")


def load_spec(
    path: str | Path,
    cache_dir: str | Path | None = None,
    check_files: bool = True,
    overrides: Mapping[str, Any] | None = None,
    checks: tuple = (),
) -> tuple[StudySpec, list[Cell]]:
    """Read and validate a spec file; returns the base spec and every grid cell's spec.

    Args:
        cache_dir: the results root's data cache (tokenizers, packed blocks), read, never written, so that the
            data checks can reuse a tokenizer a previous run trained.
        check_files: also check the data files and the evaluator (`check_data`), once per distinct data config.
        overrides: dotted key -> value, applied before validation (`apply_overrides`).
        checks: (spec, file) -> spec validations of each cell beyond the schema (`build_study`).
    Nothing is written: a spec that passes cannot fail later on anything checked here.
    """
    return load_spec_dict(
        read_yaml(path), str(path), cache_dir, check_files, overrides, spec_dir=Path(str(path)).parent, checks=checks
    )


def load_spec_dict(
    raw: Mapping[str, Any],
    file: str = "<spec dict>",
    cache_dir: str | Path | None = None,
    check_files: bool = True,
    overrides: Mapping[str, Any] | None = None,
    spec_dir: str | Path | None = None,
    checks: tuple = (),
) -> tuple[StudySpec, list[Cell]]:
    """`load_spec` for a spec already in memory (a dict, as `yaml.safe_load` of the file would give it); `file`
    names it in errors; relative paths resolve against `spec_dir` (None: as given, i.e. against the working
    directory). The same checks as a YAML file, after the overrides."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{file}: a spec must be a mapping at the top level, got {type(raw).__name__}")
    expanded_size(dict(raw), file)
    raw = apply_overrides(dict(raw), overrides, file)
    try:
        return expand(raw, file, cache_dir=cache_dir, check_files=check_files, spec_dir=spec_dir, checks=checks)
    except SpecError as e:
        raise _naming_overrides(e, overrides) from None


def expand(
    raw: dict,
    file: str,
    cache_dir: str | Path | None = None,
    check_files: bool = True,
    spec_dir: str | Path | None = None,
    checks: tuple = (),
) -> tuple[StudySpec, list[Cell]]:
    """Validate and expand a spec mapping (as read from `file`, perhaps with overrides applied): the base spec and
    every grid cell's spec. Relative paths in it resolve against `spec_dir` (fsdfm.study.paths); None = as given."""
    cells = grid_cells(raw, file)
    specs = []
    for cell in cells:
        one = cell_raw(raw, cell, file)
        if spec_dir is not None:
            one = resolve_paths(one, Path(spec_dir), file)
        specs.append(Cell(cell, build_study(one, file, checks)))
    if check_files:
        seen = set()
        for c in specs:
            key = repr((dataclasses.asdict(c.spec.data), c.spec.evaluator.kind, c.spec.evaluator.name))
            if key not in seen:
                seen.add(key)
                check_data(c.spec, file, cache_dir)
    return specs[0].spec, specs


# ------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ResolvedSpec:
    """A spec file with its command-line overrides applied and validated.

    path: the spec file. name: the study name (`study_name`). raw: the spec mapping after --limit and the
    overrides (what `--print-config` prints). overrides: the user's overrides; limit: --limit N or None.
    spec, cells: as `load_spec` returns them.
    """

    path: str
    name: str
    raw: dict
    overrides: dict
    limit: int | None
    spec: Any
    cells: list


_PAIR_ERROR = re.compile(r"report\.pairs\[(\d+)\]: ")


def _drop_stale_pairs(resolved: dict, file: str, spec_dir: str | Path | None, checks: tuple) -> dict:
    """The spec with the `report.pairs` entries that the overrides made point at nothing (a method, rule or step
    budget no longer sampled) removed, each with a warning: a report-only section never blocks a plan. The spec
    file's own pairs are still checked strictly when it is loaded without overrides (a typo is an error)."""
    report = resolved.get("report")
    if not isinstance(report, dict) or not isinstance(report.get("pairs"), list) or not report["pairs"]:
        return resolved
    out = copy.deepcopy(resolved)
    for _ in range(len(report["pairs"])):
        try:
            expand(out, file, check_files=False, spec_dir=spec_dir, checks=checks)
            return out
        except SpecError as e:
            m = _PAIR_ERROR.search(str(e))
            if m is None:
                return out  # not a pair's error: expand() reports it with its culprit
            i = int(m.group(1))
            pair = out["report"]["pairs"].pop(i)
            why = str(e)[m.end() :]
            warnings.warn(f"{file}: report.pairs[{i}] {pair} dropped after the overrides: {why}", stacklevel=2)
    return out


def _culprit(raw: dict, overrides: dict, file: str, spec_dir: str | Path | None, checks: tuple) -> str | None:
    """The key of the first override after which the spec no longer builds (None: it fails without any)."""
    applied: dict[str, Any] = {}
    for key, value in overrides.items():
        applied[key] = value
        try:
            expand(apply_overrides(raw, applied, file), file, check_files=False, spec_dir=spec_dir, checks=checks)
        except SpecError:
            return key
    return None


def load(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    check_files: bool = True,
    checks: tuple = (),
) -> ResolvedSpec:
    """Read `path`, apply --limit then `overrides`, validate and expand it (`resolve`): `fsdfm run SPEC OVERRIDES
    --limit N`. An error caused by an override names it: "SPEC: override KEY=VALUE: ..."."""
    return resolve(read_yaml(path), str(path), Path(str(path)).parent, overrides, limit, cache_dir, check_files, checks)


def resolve(
    raw: Mapping[str, Any],
    file: str,
    spec_dir: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    check_files: bool = True,
    checks: tuple = (),
) -> ResolvedSpec:
    """A spec mapping (read from `file`; relative paths against `spec_dir`, None: as given) with --limit then
    `overrides` applied, validated and expanded, and its study name (`study_name`): the one naming rule of the
    command line and of `fsdfm.run_study`, so both put the same study in the same folder."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{file}: a spec must be a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    expanded_size(raw, file)
    overrides = dict(overrides or {})
    merged: dict[str, Any] = {}
    if limit is not None:
        merged.update(limit_overrides(raw, limit, file))
    from_limit = set(merged) - set(overrides)
    merged.update(overrides)
    resolved = apply_overrides(raw, merged, file)
    try:
        if merged:
            resolved = _drop_stale_pairs(resolved, file, spec_dir, checks)
        spec, cells = expand(
            resolved, file, cache_dir=cache_dir, check_files=check_files, spec_dir=spec_dir, checks=checks
        )
    except SpecError as e:
        culprit = _culprit(raw, merged, file, spec_dir, checks) if merged else None
        if culprit is None:
            raise
        msg = str(e)
        msg = msg[len(file) + 2 :] if msg.startswith(f"{file}: ") else msg
        what = format_override(culprit, merged[culprit])
        label = f"--limit {limit} (from its limit: section, {what})" if culprit in from_limit else f"override {what}"
        raise SpecError(f"{file}: {label}: {msg}") from None
    name = check_name(study_name(spec.name, overrides, limit), "name", file)
    return ResolvedSpec(file, name, resolved, overrides, limit, spec, cells)
