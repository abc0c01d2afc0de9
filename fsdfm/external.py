"""Scoring samples made elsewhere (MDLM, Duo, the official FS-DFM code, ...) with a study's metrics and evaluator.

`fsdfm eval FILES --spec SPEC [--label L]` turns each file into one stage of kind `evaluate_external`, recorded
like any run and shown in the report as an external row (params kind="external", label = --label or the file
stem). Accepted files:

* `.jsonl`: one `{"text": ...}` (a non-empty string) per line, UTF-8; the texts are scored as they are (gen_ppl,
  MAUVE, self-BLEU read text) and encoded with the study's tokenizer for the id metrics (entropy, distinct-n,
  rep-n, gen_ppl_seq_mean), each scored at its own length: no metric sees padding (a study without a tokenizer
  cannot read text: an error);
* `.npy`: an (N, L) integer array (N >= 1, L >= 4) of ids in the study's own tokenizer/vocabulary (the declared
  vocabulary is the study's: ids outside [0, vocab) are an error naming the file), every row scored whole;
  decoded with the study's tokenizer when it has one.

Both are cut the same way: a sample longer than the study's seq_len tokens keeps its first seq_len (its text, for
the text metrics, is the decoded ids kept), and each cut is reported (`ExternalSamples.notes`, the record's
`external.n_cut`). Sizes are bounded before anything is read whole (`EvalLimits`: file bytes, line bytes,
samples; each error names the flag that raises it) and every file is checked before anything is written.

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
from fsdfm.methods.common import DATA_SOURCES, corpus_for  # importing fsdfm.methods discovers every kind
from fsdfm.methods.evaluate import EVAL_SOURCES, score_with_study_evaluators
from fsdfm.study.graph import RunSpec, STAGE_KINDS, Stage, stage_kind
from fsdfm.io import atomic_write, atomic_write_json, sha256_file
from fsdfm.launch import run_stage
from fsdfm.records import is_done, link_stages, read_plan, stage_dir

EXTERNAL_BLOBS = "_external"
EXTERNAL_KIND = "evaluate_external"
FORMATS = {".jsonl": "jsonl", ".npy": "npy"}
# what a sample stage measures and an evaluate stage copies into its metrics: external files have no sampler
SAMPLING_METRICS = ("nfe", "wall_s", "tokens_per_s", "peak_mem", "cpu_s", "load_per_core")


class ExternalError(ValueError):
    """A file that cannot be scored as external samples (exit 2, naming the file)."""


@dataclass(frozen=True)
class EvalLimits:
    """Bounds on what `fsdfm eval` reads, checked before a byte is held whole (a 100 MB one-line .jsonl is
    refused after reading max_line_bytes + 1 of it). Each is named in its error with the flag that raises it:

    max_file_bytes: size of one file (--max-file-bytes); max_line_bytes: one .jsonl line (--max-line-bytes);
    max_samples: texts or rows in one file (--max-samples). None: unbounded (the stage re-reading a file that
    already passed them)."""

    max_file_bytes: int | None = 1 << 30
    max_line_bytes: int | None = 1 << 20
    max_samples: int | None = 100_000


NO_LIMITS = EvalLimits(None, None, None)
MIN_NPY_IDS = 4  # the 4-gram metrics (rep_n, distinct_4) need 4 ids per row


@dataclass(frozen=True)
class ExternalSamples:
    """An external file as the metrics see it.

    tokens: (N, W) int64 ids in the study's tokenizer; sample i is tokens[i, :lengths[i]], the rest of its row
    is padding (EOS) that no metric scores. lengths: (N,) int64, or None when every sample fills its row (an
    .npy, whose rows are scored whole). texts: the N texts the text metrics read (as given, or decoded from the
    ids kept when cut), None without a tokenizer. cut: how many samples were longer than the study's seq_len
    (cut to it); notes: one line per cut, for the user and the record."""

    tokens: np.ndarray
    lengths: np.ndarray | None
    texts: list[str] | None
    cut: int
    notes: tuple[str, ...]


def _too_big(path: Path, what: str, size: int, limit: int, flag: str) -> ExternalError:
    return ExternalError(f"{path}: {what} {size:,} exceeds the limit {limit:,} ({flag} N raises it)")


def _check_file(path: Path, limits: EvalLimits) -> None:
    size = path.stat().st_size
    if limits.max_file_bytes is not None and size > limits.max_file_bytes:
        raise _too_big(path, "file size in bytes", size, limits.max_file_bytes, "--max-file-bytes")


def _read_npy(path: Path, corpus, limits: EvalLimits) -> ExternalSamples:
    """Rows of ids, scored whole (cut to seq_len); the header is checked before the array is read."""
    seq_len = corpus.seq_len
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")  # reads the header only
    except Exception as e:  # noqa: BLE001 - numpy's errors do not name the file
        raise ExternalError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ExternalError(f"{path}: needs an (N, L) integer array of token ids, got {arr.dtype} {arr.shape}")
    n, width = arr.shape
    if n == 0 or width < MIN_NPY_IDS:
        raise ExternalError(
            f"{path}: an ({n}, {width}) array has no samples to score; needs N >= 1 rows of L >= {MIN_NPY_IDS} ids"
        )
    if limits.max_samples is not None and n > limits.max_samples:
        raise _too_big(path, "number of rows", n, limits.max_samples, "--max-samples")
    tokens = np.array(arr[:, :seq_len], dtype=np.int64)  # only the kept columns are read into memory
    del arr
    vocab = int(corpus.vocab_size)
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ExternalError(
            f"{path}: ids in [{tokens.min()}, {tokens.max()}] but the study's vocabulary has "
            f"{vocab} ids; .npy files must use the study's tokenizer"
        )
    notes = (f"{path}: all {n} rows have {width} ids, cut to the study's seq_len {seq_len}",) if width > seq_len else ()
    tok = corpus.tokenizer
    texts = tok.decode_batch(tokens.tolist()) if tok is not None else None
    return ExternalSamples(tokens, None, texts, n if width > seq_len else 0, notes)


def _jsonl_texts(path: Path, limits: EvalLimits) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line, read a bounded line at a time."""
    max_line = limits.max_line_bytes
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(iter(lambda: f.readline(-1 if max_line is None else max_line + 1), b""), 1):
            if max_line is not None and len(raw.rstrip(b"\r\n")) > max_line:
                raise ExternalError(
                    f"{path}:{i}: line longer than {max_line:,} bytes, the limit (--max-line-bytes N raises it)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ExternalError(f"{path}:{i}: not UTF-8 (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or "text" not in row:
                raise ExternalError(f'{path}:{i}: each line must be a JSON object with a "text" key')
            text = row["text"]
            if not isinstance(text, str):
                raise ExternalError(f'{path}:{i}: "text" must be a string, got {type(text).__name__} ({text!r:.40})')
            if not text.strip():
                raise ExternalError(f'{path}:{i}: "text" is empty; there is nothing to score')
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ExternalError(
                    f'{path}:{i}: "text" is not valid Unicode ({e.reason} at character {e.start})'
                ) from None
            out.append((i, text))
            if limits.max_samples is not None and len(out) > limits.max_samples:
                raise _too_big(path, "number of texts over", len(out), limits.max_samples, "--max-samples")
    if not out:
        raise ExternalError(f"{path}: no samples")
    return out


def _max_token_chars(tok) -> int:
    """The longest vocabulary entry in characters (byte-level: one character per byte, so >= its text): a text
    cut to (seq_len + 1) * this many characters still holds more than seq_len tokens if the whole text does."""
    return max(1, max(len(t) for t in tok.backend.get_vocab(with_added_tokens=True)))


def _read_jsonl(path: Path, corpus, limits: EvalLimits) -> ExternalSamples:
    """Texts as given, encoded with the study's tokenizer; one longer than seq_len tokens is cut to seq_len and
    its text becomes the decoded ids kept (so the text metrics and the id metrics see the same sample)."""
    rows = _jsonl_texts(path, limits)
    tok = corpus.tokenizer
    if tok is None:
        raise ExternalError(
            f"{path}: a .jsonl of texts needs a study with a tokenizer; this study's data "
            f"({corpus.__class__.__name__}) has none: pass a .npy of ids"
        )
    seq_len = corpus.seq_len
    char_cap = (seq_len + 1) * _max_token_chars(tok)  # bounds the tokenizer's work on a huge text
    texts = [t for _, t in rows]
    ids = tok.encode_batch([t[:char_cap] for t in texts])
    cut = [i for i, e in enumerate(ids) if len(e) > seq_len]
    for i in cut:
        ids[i] = ids[i][:seq_len]
        texts[i] = tok.decode(ids[i])
    empty = [rows[i][0] for i, e in enumerate(ids) if not e]
    if empty:
        raise ExternalError(f"{path}:{empty[0]}: the text encodes to no token; there is nothing to score")
    lengths = np.array([len(e) for e in ids], dtype=np.int64)
    width = max(int(lengths.max()), MIN_NPY_IDS)
    pad = corpus.eos_id if corpus.eos_id is not None else 0
    tokens = np.full((len(ids), width), pad, dtype=np.int64)
    for i, e in enumerate(ids):
        tokens[i, : len(e)] = e
    notes = ()
    if cut:
        lines = ", ".join(str(rows[i][0]) for i in cut[:10]) + (", ..." if len(cut) > 10 else "")
        notes = (
            f"{path}: {len(cut)} of {len(ids)} texts longer than the study's seq_len {seq_len} tokens were cut "
            f"to {seq_len} (lines {lines})",
        )
    full = bool((lengths == width).all())
    return ExternalSamples(tokens, None if full else lengths, texts, len(cut), notes)


def read_external(path: Path, corpus, limits: EvalLimits = NO_LIMITS) -> ExternalSamples:
    """An external sample file (see module) in the study's tokenizer, within `limits`; every refusal is one
    ExternalError naming the file (and line), every cut a note."""
    path = Path(path)
    _check_file(path, limits)
    if FORMATS.get(path.suffix) == "npy":
        return _read_npy(path, corpus, limits)
    return _read_jsonl(path, corpus, limits)


# 2: each text scored at its own length (1 padded every text with EOS to seq_len and scored the padding), texts
# and .npy rows cut to seq_len alike; 3: also scored under the study's second evaluator where it has one
# (gen_ppl_second, as its evaluate stages are)
EXTERNAL_VERSION = "3"


@stage_kind(
    EXTERNAL_KIND,
    resources="gpu",
    version=EXTERNAL_VERSION,
    sources=(
        "fsdfm.external:evaluate_external_stage",
        "fsdfm.external:read_external",
        *DATA_SOURCES,
        *EVAL_SOURCES,
    ),
)
def evaluate_external_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The study's sample metrics on an external sample file (copied into out_dir), and the per-sample table."""
    ext = config["external"]
    suffix = next(s for s, f in FORMATS.items() if f == ext["format"])
    blob = Path(out_dir).resolve().parent.parent / EXTERNAL_BLOBS / f"{ext['sha256']}{suffix}"
    if not blob.is_file() or sha256_file(blob) != ext["sha256"]:
        raise ExternalError(
            f"{blob}: the external file with sha256 {ext['sha256'][:12]} is missing or changed; "
            "run fsdfm eval on it again"
        )
    mine = Path(out_dir) / f"external{suffix}"
    shutil.copyfile(blob, mine)
    corpus = corpus_for(config, out_dir)
    got = read_external(mine, corpus)  # the limits were checked when `fsdfm eval` took the file
    n = int(got.tokens.shape[0])
    scored = score_with_study_evaluators(config, inputs, corpus, got.tokens, got.texts, out_dir, got.lengths)
    lengths = got.lengths if got.lengths is not None else np.full(n, got.tokens.shape[1])
    return {
        **scored,
        "n_samples": n,
        "external": {
            "sha256": ext["sha256"],
            "format": ext["format"],
            "n_cut": got.cut,
            "cut_to": corpus.seq_len,
            "notes": list(got.notes),
            "length_mean": float(lengths.mean()),
            "length_min": int(lengths.min()),
            "length_max": int(lengths.max()),
        },
    }


@dataclass(frozen=True)
class ExternalRun:
    """One scored file: its label, the stage id (holding the content hash), the run id and the metrics."""

    file: str
    label: str
    stage_id: str
    run_id: str
    metrics: dict
    notes: tuple[str, ...] = ()


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


def eval_files(
    sdir: Path, root: Path, files: list[str], labels: list[str] | None = None, limits: EvalLimits | None = None
) -> list[ExternalRun]:
    """Score each of `files` with the metrics and evaluator of the study in `sdir` (its plan written: the
    study's evaluator stage must be done); records them in `sdir`/external.json; returns what was scored.
    Every file is read and checked (`limits`, default EvalLimits()) before anything is written."""

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
        got = read_external(p, corpus, limits or EvalLimits())  # checked before anything is written
        tokens = got.tokens
        sha = sha256_file(p)
        config = {
            **base,
            "n_samples": int(tokens.shape[0]),
            "external": {"sha256": sha, "format": FORMATS[p.suffix], "n_samples": int(tokens.shape[0])},
        }
        stage = Stage(EXTERNAL_KIND, config, inputs, {**fingerprint, "external_kind": EXTERNAL_VERSION})
        label = labels[i] if labels else p.stem
        run = RunSpec(
            run_id=f"external-{label}-{sha[:8]}",
            stage_id=stage.id,
            params={"kind": "external", "label": label, "method": "external", "file": str(p)},
        )
        todo.append((p, stage, run, got.notes))
    ext_path = sdir / EXTERNAL
    try:
        ext = json.loads(ext_path.read_text()) if ext_path.is_file() else {}
    except ValueError:
        ext = {}
    stages, runs = dict(ext.get("stages") or {}), list(ext.get("runs") or [])
    for p, stage, run, _ in todo:
        blob = root / EXTERNAL_BLOBS / f"{stage.config['external']['sha256']}{p.suffix}"
        if not blob.is_file():
            atomic_write(blob, p.read_bytes())
        stages[stage.id] = stage.to_dict()
        runs = [r for r in runs if r["run_id"] != run.run_id] + [run.to_dict()]
    link_stages(sdir, [s.id for _, s, _, _ in todo], root)
    atomic_write_json(ext_path, {"stages": stages, "runs": runs, "kinds": _kind_hint()})
    out = []
    for p, stage, run, notes in todo:
        rec = run_stage(sdir, stage.id)
        out.append(ExternalRun(str(p), run.params["label"], stage.id, run.run_id, rec["payload"]["metrics"], notes))
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
