"""Scoring samples made elsewhere (MDLM, Duo, the official FS-DFM code, ...) with a study's metrics and evaluator.

`fsdfm eval FILES --spec SPEC [--label L]` turns each file into one stage of kind `evaluate_external`, recorded
like any run and shown in the report as an external row (params kind="external", label = --label or the file
stem). Accepted files:

* `.jsonl`: one `{"text": ...}` per line; the texts are scored as they are (gen_ppl, MAUVE, self-BLEU read
  text) and encoded with the study's tokenizer for the id metrics (entropy, distinct-n, rep-n), each row cut
  at seq_len and padded with EOS (a study without a tokenizer cannot read text: an error);
* `.npy`: an (N, L) integer array of ids in the study's own tokenizer/vocabulary (the declared vocabulary is
  the study's: ids outside [0, vocab) are an error naming the file); decoded with the study's tokenizer when
  it has one.

The stage's config is the study's evaluate config (metrics, evaluator, seed, data) plus
`external: {sha256, format, n_samples}`, so its id holds the file's content hash: the same file scored twice
is one stage; a changed file is a new one. The file is copied, content-addressed, to
`<root>/_external/<sha256><suffix>` and from there into the stage folder (`external<suffix>`, a hashed
artefact), so the record stays checkable when the original moves. The stage and its run are listed in
`<study>/external.json`, which `fsdfm.records.read_plan` (every reader of a plan) merges into the plan (plan.json
itself is rewritten by every `fsdfm run`; an external stage whose evaluator input is no longer planned is
dropped from the merge, with a warning).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsdfm.records.layout import EXTERNAL, merge_external  # noqa: F401 - the plan reader merges external.json
from fsdfm.study.graph import RunSpec, STAGE_KINDS, Stage, stage_kind
from fsdfm.io import atomic_write, atomic_write_json, sha256_file
from fsdfm.launch import run_stage
from fsdfm.records import is_done, link_stages, read_plan, stage_dir

EXTERNAL_BLOBS = "_external"
EXTERNAL_KIND = "evaluate_external"
FORMATS = {".jsonl": "jsonl", ".npy": "npy"}
# what a sample stage measures and an evaluate stage copies into its metrics: external files have no sampler
SAMPLING_METRICS = ("nfe", "wall_s", "tokens_per_s", "peak_mem")


class ExternalError(ValueError):
    """A file that cannot be scored as external samples (exit 2, naming the file)."""


def _sha256(path: Path) -> str:
    return sha256_file(path)


def read_external(path: Path, corpus) -> tuple[np.ndarray, list[str] | None]:
    """(tokens (N, L) int64, texts or None) of an external sample file in the study's tokenizer (see module)."""
    fmt = FORMATS.get(path.suffix)
    seq_len = corpus.seq_len
    tok = corpus.tokenizer
    if fmt == "npy":
        try:
            tokens = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy's errors do not name the file
            raise ExternalError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ExternalError(
                f"{path}: needs an (N, L) integer array of token ids, got {tokens.dtype} {tokens.shape}"
            )
        vocab = int(corpus.vocab_size)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ExternalError(
                f"{path}: ids in [{tokens.min()}, {tokens.max()}] but the study's vocabulary has "
                f"{vocab} ids; .npy files must use the study's tokenizer"
            )
        tokens = tokens.astype(np.int64)
        return tokens, (tok.decode_batch(tokens.tolist()) if tok is not None else None)
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
        except (ValueError, KeyError, TypeError):
            raise ExternalError(f'{path}:{i}: each line must be a JSON object with a "text" key') from None
    if not texts:
        raise ExternalError(f"{path}: no samples")
    if tok is None:
        raise ExternalError(
            f"{path}: a .jsonl of texts needs a study with a tokenizer; this study's data "
            f"({corpus.__class__.__name__}) has none: pass a .npy of ids"
        )
    pad = corpus.eos_id if corpus.eos_id is not None else 0
    tokens = np.full((len(texts), seq_len), pad, dtype=np.int64)
    for i, ids in enumerate(tok.encode_batch(texts)):
        ids = ids[:seq_len]
        tokens[i, : len(ids)] = ids
    return tokens, texts


@stage_kind(EXTERNAL_KIND, resources="gpu", version="1")
def evaluate_external_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The study's sample metrics on an external sample file (copied into out_dir), and the per-sample table."""
    from fsdfm.methods.evaluate import _sample_metric_names, load_study_evaluator, score_samples  # heavy: torch
    from fsdfm.methods.common import corpus_for, device  # heavy: torch

    ext = config["external"]
    suffix = next(s for s, f in FORMATS.items() if f == ext["format"])
    blob = Path(out_dir).resolve().parent.parent / EXTERNAL_BLOBS / f"{ext['sha256']}{suffix}"
    if not blob.is_file() or _sha256(blob) != ext["sha256"]:
        raise ExternalError(
            f"{blob}: the external file with sha256 {ext['sha256'][:12]} is missing or changed; "
            "run fsdfm eval on it again"
        )
    mine = Path(out_dir) / f"external{suffix}"
    shutil.copyfile(blob, mine)
    corpus = corpus_for(config, out_dir)
    tokens, texts = read_external(mine, corpus)
    n = int(tokens.shape[0])
    evaluator = load_study_evaluator(config, inputs, device())
    refs = corpus.texts("valid", n) if corpus.tokenizer is not None else None
    scored = score_samples(
        config, tokens, texts, refs, evaluator, corpus, out_dir, _sample_metric_names(config, evaluator)
    )
    return {**scored, "n_samples": n, "external": {"sha256": ext["sha256"], "format": ext["format"]}}


@dataclass(frozen=True)
class ExternalRun:
    """One scored file: its label, the stage id (holding the content hash), the run id and the metrics."""

    file: str
    label: str
    stage_id: str
    run_id: str
    metrics: dict


def _eval_config(plan: dict, n: int) -> tuple[dict, dict, dict]:
    """(config, inputs, fingerprint) of the study's evaluate stages with n_samples = n: metrics, evaluator, seed, data are
    shared by all of them (an evaluate stage differs from another only in the samples it reads)."""
    ev = [st for st in plan["stages"].values() if st["kind"] == "evaluate"]
    if not ev:
        raise ExternalError(f"study {plan['name']!r} plans no evaluate stage, so it has no metrics to score with")
    st = ev[0]
    config = {**st["config"], "n_samples": n}
    inputs = {k: v for k, v in (st.get("inputs") or {}).items() if k != "samples"}
    # the metric code versions and data hashes are the evaluate stage's: a bumped metric re-scores the file too
    return config, inputs, dict(st.get("fingerprint") or {})


def eval_files(sdir: Path, root: Path, files: list[str], labels: list[str] | None = None) -> list[ExternalRun]:
    """Score each of `files` with the metrics and evaluator of the study in `sdir` (its plan written: the
    study's evaluator stage must be done); records them in `sdir`/external.json; returns what was scored."""
    import fsdfm.methods  # noqa: F401  (heavy: torch; registers the method and stage kinds this one builds on)
    from fsdfm.methods.common import corpus_for  # heavy: torch

    paths = [Path(f) for f in files]
    for p in paths:
        if p.suffix not in FORMATS:
            raise ExternalError(f"{p}: unknown sample file type {p.suffix!r}; use .jsonl (texts) or .npy (ids)")
        if not p.is_file():
            raise ExternalError(f"{p}: no such file")
    if labels is not None and len(labels) != len(paths):
        raise ExternalError(f"--label given {len(labels)} time(s) for {len(paths)} file(s); give one per file")
    plan = read_plan(sdir)
    base, inputs, fingerprint = _eval_config(plan, 1)
    for name, dep in inputs.items():
        if not is_done(stage_dir(sdir, dep)):
            raise ExternalError(f"study {plan['name']!r}: its {name} stage {dep} is not done; run the study first")
    corpus = corpus_for(base, sdir)
    todo = []
    for i, p in enumerate(paths):
        tokens, _ = read_external(p, corpus)  # checked before anything is written
        sha = _sha256(p)
        config = {
            **base,
            "n_samples": int(tokens.shape[0]),
            "external": {"sha256": sha, "format": FORMATS[p.suffix], "n_samples": int(tokens.shape[0])},
        }
        stage = Stage(EXTERNAL_KIND, config, inputs, {**fingerprint, "external_kind": "1"})
        label = labels[i] if labels else p.stem
        run = RunSpec(
            run_id=f"external-{label}-{sha[:8]}",
            stage_id=stage.id,
            params={"kind": "external", "label": label, "method": "external", "file": str(p)},
        )
        todo.append((p, stage, run))
    ext_path = sdir / EXTERNAL
    try:
        ext = json.loads(ext_path.read_text()) if ext_path.is_file() else {}
    except ValueError:
        ext = {}
    stages, runs = dict(ext.get("stages") or {}), list(ext.get("runs") or [])
    for p, stage, run in todo:
        blob = root / EXTERNAL_BLOBS / f"{stage.config['external']['sha256']}{p.suffix}"
        if not blob.is_file():
            atomic_write(blob, p.read_bytes())
        stages[stage.id] = stage.to_dict()
        runs = [r for r in runs if r["run_id"] != run.run_id] + [run.to_dict()]
    link_stages(sdir, [s.id for _, s, _ in todo], root)
    atomic_write_json(ext_path, {"stages": stages, "runs": runs, "kinds": _kind_hint()})
    out = []
    for p, stage, run in todo:
        rec = run_stage(sdir, stage.id)
        out.append(ExternalRun(str(p), run.params["label"], stage.id, run.run_id, rec["payload"]["metrics"]))
    return out


def _kind_hint() -> dict:
    """The plan's `kinds` entry for this kind (module and version), as StudyPlan.to_dict writes it."""
    k = STAGE_KINDS.get(EXTERNAL_KIND)
    return {
        EXTERNAL_KIND: {
            "module": k.module,
            "import_root": k.import_root,
            "checkpointable": k.checkpointable,
            "resources": k.resources,
        }
    }
