"""Keeping declared versions honest: a committed table of source digests per versioned unit.

Every stage kind (`@stage_kind(..., version=...)`) and every metric (`METRICS`, `@register_metric(..., version=...)`) carries
a declared version string that enters the ids of the stages that compute it (see `fsdfm.fingerprint` for why
declared strings and not hashes of the code). A unit's *sources* (`SOURCES`: modules, or `module:function`
for one function of a shared module) are what compute it. tests/fixtures/code_versions.json holds, per unit,
its version and the sha256 of each source as of the last refresh. `check()` (run by tests/test_versions.py)
fails when

* a unit's sources changed while its version did not: "bump the version of X" -- or, when its results cannot
  change (a comment, a rename, a refactor), refresh the table, which a reviewer then sees in the diff;
* a version changed, a unit was added or removed, and the table was not refreshed.

Refresh with `python -m fsdfm.versions --write` (prints what changed; ends with one JSON line).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fsdfm.io import atomic_write_json
from fsdfm.study.graph import STAGE_KINDS

TABLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "code_versions.json"

# what every stage that loads a corpus depends on
_DATA = (
    "fsdfm.data.base:load_corpus",
    "fsdfm.data.documents",
    "fsdfm.data.tokenizer",
    "fsdfm.data.text",
    "fsdfm.data.tokenfiles",
    "fsdfm.data.hf",
    "fsdfm.data.oracle",
    "fsdfm.methods.common:corpus_for",
)
# the oracle sources (fsdfm.data.oracle's own file is the dataset kind, in _DATA)
_ORACLE = ("fsdfm.data.oracle.sources", "fsdfm.data.oracle.markov", "fsdfm.data.oracle.hmm")
# what every DiT training stage depends on
_DIT = (
    "fsdfm.model",
    "fsdfm.train",
    "fsdfm.paths",
    "fsdfm.schedulers",
    "fsdfm.methods.common:save_dit",
    "fsdfm.methods.common:build_model_config",
    "fsdfm.methods.common:train_metrics",
    "fsdfm.methods.common:loss_curve",
    "fsdfm.methods.common:fit_dit",
)
_EVAL = (
    "fsdfm.methods.evaluate:load_study_evaluator",
    "fsdfm.methods.evaluate:_metric_kwargs",
    "fsdfm.methods.evaluate:_sample_metric_names",
    "fsdfm.metrics.oracle:extra_metrics",
    "fsdfm.metrics.sample:compute_metrics",
)

_LENGTHS = (
    "fsdfm.metrics.diversity:as_lengths",
    "fsdfm.metrics.diversity:valid_mask",
    "fsdfm.metrics.diversity:_gram_mask",
)
SOURCES: dict[str, tuple[str, ...]] = {
    # stage kinds (fsdfm.methods)
    "stage:train_dfm": (
        "fsdfm.methods.dfm:train_dfm",
        *_DIT,
        *_DATA,
        "fsdfm.objectives",
        "fsdfm.losses",
        "fsdfm.methods.dfm:dfm_validation",
        "fsdfm.methods.dfm:unigram_ce",
        "fsdfm.methods.common:path_from_config",
    ),
    "stage:distil_fsdfm": (
        "fsdfm.methods.fsdfm:distil_fsdfm",
        *_DIT,
        *_DATA,
        "fsdfm.objectives",
        "fsdfm.losses",
        "fsdfm.methods.common:load_dit",
        "fsdfm.methods.fsdfm:FSDFMSettings",
        "fsdfm.teachers",
        "fsdfm.methods.exact_teacher",
        "fsdfm.oracle_posterior",
    ),
    "stage:train_ar": (
        "fsdfm.methods.ar:train_ar_stage",
        "fsdfm.ar",
        "fsdfm.train",
        *_DATA,
        "fsdfm.methods.common:build_model_config",
        "fsdfm.methods.common:train_metrics",
    ),
    "stage:train_flm": ("fsdfm.methods.flm:train_flm", *_DIT, *_DATA, "fsdfm.flm"),
    "stage:distil_fmlm": (
        "fsdfm.methods.fmlm:distil_fmlm",
        *_DIT,
        *_DATA,
        "fsdfm.flm",
        "fsdfm.fmlm",
        "fsdfm.methods.common:load_dit",
    ),
    "stage:sample": (
        "fsdfm.methods.evaluate:sample_stage",
        *_DATA,
        "fsdfm.samplers",
        "fsdfm.sparse_step",
        "fsdfm.methods.dfm:sample_dfm",
        "fsdfm.methods.ar:sample_ar_model",
        "fsdfm.methods.flm:continuous_sampler",
        "fsdfm.methods.evaluate:write_samples",
        "fsdfm.methods.common:load_dit",
        "fsdfm.methods.common:RowCounter",
        "fsdfm.methods.evaluate:counted_nfe",
        "fsdfm.metrics.timing:timed",
        "fsdfm.methods.exact:sample_exact",
        "fsdfm.ar:sample_ar",
        "fsdfm.flm",
        "fsdfm.methods.exact_teacher",
        "fsdfm.oracle_posterior",
    ),
    "stage:evaluate": ("fsdfm.methods.evaluate:evaluate_stage", *_DATA, *_EVAL, "fsdfm.methods.evaluate:read_samples"),
    "stage:evaluate_data": (
        "fsdfm.methods.evaluate:evaluate_data_stage",
        *_DATA,
        *_EVAL,
        "fsdfm.metrics.sample:data_reference",
    ),
    "stage:load_released": ("fsdfm.methods.released:load_released_stage", "fsdfm.released_checkpoints", *_DATA),
    "stage:exact_posterior": (
        "fsdfm.methods.exact:exact_posterior_stage",
        "fsdfm.methods.exact_teacher",
        "fsdfm.oracle_posterior",
        *_ORACLE,
        *_DATA,
    ),
    "stage:pos_divergence": (
        "fsdfm.methods.evaluate:pos_divergence_stage",
        *_DATA,
        "fsdfm.samplers",
        "fsdfm.sparse_step",
        "fsdfm.methods.common:load_dit",
    ),
    # metrics (fsdfm.metrics.registry); _LENGTHS: per-sample lengths (external texts), a no-op on model samples
    "metric:gen_ppl": ("fsdfm.metrics.perplexity", "fsdfm.metrics.evaluator", "fsdfm.metrics.sample:_gen_ppl"),
    "metric:gen_ppl_seq_mean": (
        *_LENGTHS,
        "fsdfm.metrics.perplexity",
        "fsdfm.metrics.evaluator",
        "fsdfm.metrics.sample:_gen_ppl_seq_mean",
    ),
    "metric:entropy_nats": ("fsdfm.metrics.diversity:entropy", "fsdfm.metrics.diversity:as_token_matrix", *_LENGTHS),
    "metric:entropy_bits": ("fsdfm.metrics.diversity:entropy", "fsdfm.metrics.diversity:as_token_matrix", *_LENGTHS),
    **{
        f"metric:distinct_{n}": (
            "fsdfm.metrics.diversity:distinct_n",
            "fsdfm.metrics.diversity:_ngrams",
            "fsdfm.metrics.diversity:as_token_matrix",
            *_LENGTHS,
        )
        for n in range(1, 5)
    },
    "metric:self_bleu": ("fsdfm.metrics.diversity:self_bleu", "fsdfm.metrics.sample:_self_bleu"),
    "metric:rep_n": (
        "fsdfm.metrics.diversity:rep_n",
        "fsdfm.metrics.diversity:rep_n_per_sample",
        "fsdfm.metrics.diversity:rep_n_mean",
        "fsdfm.metrics.diversity:_ngrams",
        "fsdfm.metrics.diversity:as_token_matrix",
        "fsdfm.metrics.sample:_rep_n",
        *_LENGTHS,
    ),
    "metric:mauve": ("fsdfm.metrics.mauve", "fsdfm.metrics.sample:_mauve"),
    **{
        f"metric:{m}": ("fsdfm.metrics.timing", "fsdfm.memory")
        for m in ("nfe", "wall_s", "tokens_per_s", "peak_mem", "cpu_s", "load_per_core")
    },
    "metric:val_nll": ("fsdfm.methods.dfm:dfm_validation", "fsdfm.ar:ar_nll"),
    "metric:elbo_ppl": ("fsdfm.methods.dfm:dfm_validation", "fsdfm.ar:ar_nll"),
    "metric:pos_divergence": ("fsdfm.metrics.divergence",),
    "metric:pos_divergence_slope": ("fsdfm.metrics.divergence",),
    **{
        f"metric:{m}": (*_ORACLE, f"fsdfm.metrics.oracle:_{m}", "fsdfm.metrics.oracle:OracleInputs")
        for m in ("oracle_nll", "oracle_expected_nll", "oracle_entropy_rate")
    },
    "metric:posterior_kl": (
        "fsdfm.metrics.oracle:posterior_kl",
        "fsdfm.oracle_posterior",
        "fsdfm.methods.common:oracle_model_metrics",
    ),
    **{
        f"metric:{m}": ("fsdfm.metrics.oracle", *_ORACLE)
        for m in ("ngram_tv", "ngram_kl", "ngram_tv_floor", "ngram_kl_floor")
    },
}

# fsdfm eval's stage (fsdfm.external): the evaluate stage's metric code on a file instead of a sample stage
SOURCES["stage:evaluate_external"] = (
    "fsdfm.external:evaluate_external_stage",
    "fsdfm.external:read_external",
    *_DATA,
    *_EVAL,
)


@dataclass(frozen=True)
class Unit:
    """One versioned unit: `name` ("stage:<kind>" or "metric:<name>"), its declared `version`, the sha256 of
    each of its sources (`digests`: ref -> hex) and where its version is declared (`where`)."""

    name: str
    version: str
    digests: dict
    where: str


def source_digest(ref: str) -> str:
    """sha256 of a source: a module's file bytes ("fsdfm.model") or one object's source ("fsdfm.methods.common:fn")."""
    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    if attr:
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
        text = inspect.getsource(obj).encode()
    else:
        text = Path(mod.__file__).read_bytes()
    return hashlib.sha256(text.replace(b"\r\n", b"\n")).hexdigest()


def current_units() -> tuple[dict[str, Unit], list[str]]:
    """Every versioned unit of the installed code ({name: Unit}) and the problems found while collecting them
    (a unit without declared sources, a source that does not import)."""
    import fsdfm.external  # noqa: F401  (heavy: torch; registers evaluate_external)
    import fsdfm.methods  # noqa: F401  (heavy: torch; registers the method and stage kinds)
    from fsdfm.metrics.registry import METRICS  # heavy: torch

    declared = {}
    for kind in STAGE_KINDS.names():
        k = STAGE_KINDS.get(kind)
        if k.module.startswith("fsdfm."):  # the package's own kinds (tests register fakes of their own)
            declared[f"stage:{kind}"] = (k.version, f"@stage_kind({kind!r}, version=...) in {k.module}")
    for name in METRICS.names():
        declared[f"metric:{name}"] = (
            METRICS.get(name).version,
            f"register_metric({name!r}, ..., version=...) (fsdfm.metrics)",
        )
    units, problems = {}, []
    for name, (version, where) in sorted(declared.items()):
        refs = SOURCES.get(name)
        if not refs:
            problems.append(
                f"{name}: no sources declared: list the modules/functions that compute it in "
                "fsdfm.versions.SOURCES, then run python -m fsdfm.versions --write"
            )
            continue
        digests = {}
        for ref in refs:
            try:
                digests[ref] = source_digest(ref)
            except (ImportError, AttributeError, OSError, TypeError) as e:
                problems.append(
                    f"{name}: source {ref!r} cannot be read ({type(e).__name__}: {e}); fix fsdfm.versions.SOURCES"
                )
        units[name] = Unit(name, version, digests, where)
    return units, problems


def compare(table: dict, units: dict[str, Unit]) -> list[str]:
    """Problems between the committed `table` ({name: {"version", "sources": {ref: hex}}}) and `units`."""
    refresh = "python -m fsdfm.versions --write"
    out = []
    for name, u in sorted(units.items()):
        row = table.get(name)
        if row is None:
            out.append(f"{name}: not in {TABLE.name}: add it with {refresh}")
            continue
        if row.get("version") != u.version:
            out.append(f"{name}: version {row.get('version')!r} -> {u.version!r} is not in {TABLE.name}: {refresh}")
            continue
        old = row.get("sources") or {}
        changed = sorted(r for r in set(old) | set(u.digests) if old.get(r) != u.digests.get(r))
        if changed:
            out.append(
                f"{name}: its sources changed ({', '.join(changed)}) but its version is still {u.version!r}: "
                f"bump the version of {name} ({u.where}) if its results can change; if they cannot "
                f"(a comment, a refactor), refresh the table with {refresh}"
            )
    for name in sorted(set(table) - set(units)):
        out.append(f"{name}: in {TABLE.name} but no longer a versioned unit: {refresh}")
    return out


def read_table(path: Path = TABLE) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def check(path: Path = TABLE) -> list[str]:
    """Every problem with the declared versions (empty: all versions are honest)."""
    units, problems = current_units()
    return problems + compare(read_table(path), units)


def write(path: Path = TABLE) -> dict:
    """Refresh the table from the current code; returns the names of the units whose rows changed."""
    units, problems = current_units()
    if problems:
        raise SystemExit("\n".join(problems))
    old = read_table(path)
    table = {n: {"version": u.version, "sources": u.digests} for n, u in sorted(units.items())}
    atomic_write_json(path, table)
    return {"changed": sorted(n for n in set(old) | set(table) if old.get(n) != table.get(n))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsdfm.versions", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"refresh {TABLE} from the current code")
    args = ap.parse_args(argv)
    if args.write:
        res = write()
        for n in res["changed"]:
            print(f"  refreshed {n}")
        print(f"{TABLE}: {len(res['changed'])} units refreshed")
        print(json.dumps({"ok": True, "table": str(TABLE), **res}))
        return 0
    problems = check()
    for p in problems:
        print(f"  {p}")
    print(f"{TABLE}: {'up to date' if not problems else f'{len(problems)} problems'}")
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
