"""The stages after a model exists, shared by every kind: sample, evaluate, evaluate_data, pos_divergence.

`sample` runs the kind's sampler (SAMPLERS, registered by each kind file) and records tokens, decoded text,
NFE, wall-clock and peak memory; `evaluate` scores one sample set with the study's metrics (fsdfm.metrics) and
writes the per-sample table; `evaluate_data` is the data reference row; `pos_divergence` compares a few-step
student with its many-step teacher from states on teacher paths.

Boundary: knows samplers by name, metrics by name and the records' per-sample table; compares no method kind.
`pos_divergence` assumes what a kind that opts into it (`MethodKind.pos_divergence`) guarantees: both models are
DiTs on a mixture path (`load_dit`), rolled out with the cumulative_scalar rule.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.methods.common import (
    DATA_SOURCES,
    SAMPLERS,
    ArtefactError,
    LoadedDiT,
    corpus_for,
    device,
    forward_autocast,
    forward_precision,
    load_dit,
    tf32_matmuls,
)
from fsdfm.io import atomic_write
from fsdfm.metrics.oracle import corpus_metric_names, extra_metrics  # the oracle corpus metrics (registered there)
from fsdfm.samplers import get_rule, sample, time_grid, update
from fsdfm.sparse_step import compiled_block_sums
from fsdfm.study.graph import stage_kind
from fsdfm.metrics import SAMPLE_METRICS, MetricSet, compute_metric_set
from fsdfm.metrics.divergence import pos_divergence
from fsdfm.metrics.diversity import entropy, rep_n_per_sample
from fsdfm.metrics.evaluator import load_evaluator
from fsdfm.metrics.texts import END_MARKERS
from fsdfm.metrics.timing import timed
from fsdfm.records import PER_SAMPLE, read_record, write_per_sample

# what every stage that computes sample metrics depends on (with DATA_SOURCES): part of their `sources`
EVAL_SOURCES = (
    "fsdfm.methods.evaluate:load_study_evaluator",
    "fsdfm.methods.evaluate:load_second_evaluator",
    "fsdfm.methods.evaluate:_metric_kwargs",
    "fsdfm.methods.evaluate:_sample_metric_names",
    "fsdfm.methods.evaluate:score_samples",
    "fsdfm.methods.evaluate:score_with_study_evaluators",
    "fsdfm.metrics.oracle:extra_metrics",
    "fsdfm.metrics.sample:compute_metrics",
)


# cpu_s and load_per_core are recorded beside the timing too, but are not listed: they describe the machine, not
# the samples, and listing them would change the id of every sample stage
@stage_kind(
    "sample",
    resources="gpu",
    version="1",
    metrics=("nfe", "wall_s", "tokens_per_s", "peak_mem"),
    sources=(
        "fsdfm.methods.evaluate:sample_stage",
        *DATA_SOURCES,
        "fsdfm.samplers",
        "fsdfm.sparse_step",
        "fsdfm.sampling.knobs",
        "fsdfm.sampling.loop",
        "fsdfm.sampling.steps",
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
)
def sample_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Draw n_samples from a trained method; record tokens, decoded text, NFE, wall-clock and peak memory.

    NFE is counted, not inferred: the network evaluations the sampler's RowCounter saw, per sample (a sampler
    without a counter reports its own). Wall-clock and peak memory come from one timer (fsdfm.metrics.timing.timed)
    around the draw only: model loading and the sampler's warm-up are outside it."""
    corpus = corpus_for(config, out_dir)
    dev = device()
    gen = torch.Generator(dev).manual_seed(config["seed"])
    draw = SAMPLERS.get(config["sampler"])(inputs["model"], config, corpus, dev)
    with tf32_matmuls(forward_autocast(config)):
        timing = timed(lambda: draw.run(gen), warmup=0, device=dev)
    out, peak, peak_kind, wall_s = timing.result, timing.peak_mem_bytes, timing.peak_mem_kind, timing.wall_s
    nfe = out.nfe if draw.counter is None else counted_nfe(draw.counter.rows, config["n_samples"])
    tokens = out.tokens.cpu().numpy().astype(np.int64)
    if tokens.shape != (config["n_samples"], corpus.seq_len):
        raise RuntimeError(f"sampler returned {tokens.shape}, expected {(config['n_samples'], corpus.seq_len)}")
    write_samples(Path(out_dir), tokens, corpus)
    n_tok = tokens.size
    return {
        "metrics": {
            "nfe": nfe,
            "wall_s": wall_s,
            "tokens_per_s": n_tok / wall_s if wall_s > 0 else None,
            "peak_mem": peak,
            "cpu_s": timing.cpu_s,
            "load_per_core": timing.load_per_core,
        },
        "peak_mem_kind": peak_kind,
        "device": str(dev),
        "precision": config["precision"],
        "forward_precision": forward_precision(config),
        **({"compiled_block_sums": True} if dev.type == "cuda" and compiled_block_sums() else {}),
        "time_grid": [float(t) for t in out.time_grid[:2049]],
        "numerics": out.numerics.to_dict() if getattr(out, "numerics", None) else None,
        # where NFE varies per sample (threshold decoding): its mean and max over the samples
        **(
            {"nfe_per_sample": _nfe_summary(out.nfe_per_sample)}
            if getattr(out, "nfe_per_sample", None) is not None
            else {}
        ),
    }


def _nfe_summary(nfe: torch.Tensor) -> dict:
    return {"mean": float(nfe.double().mean()), "max": float(nfe.max()), "min": float(nfe.min())}


def counted_nfe(rows: int, n_samples: int) -> int | float:
    """Network evaluations per sample from the rows a RowCounter saw (an int when every sample saw as many)."""
    return rows // n_samples if rows % n_samples == 0 else rows / n_samples


def write_samples(out_dir: Path, tokens: np.ndarray, corpus) -> None:
    """samples.npy (token ids) and samples.jsonl (decoded text), each written atomically."""
    buf = io.BytesIO()
    np.save(buf, tokens)
    atomic_write(out_dir / "samples.npy", buf.getvalue())
    if corpus.tokenizer is not None:
        texts = corpus.tokenizer.decode_batch(tokens.tolist())
        atomic_write(out_dir / "samples.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


def read_samples(stage_dir: Path) -> tuple[np.ndarray, list[str] | None]:
    path = Path(stage_dir) / "samples.npy"
    try:
        tokens = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's errors for a truncated file name no file
        raise ArtefactError(
            f"{path}: cannot be read as samples ({type(e).__name__}: {e}); re-run the study, "
            "which redoes damaged stages"
        ) from e
    p = Path(stage_dir) / "samples.jsonl"
    texts = [json.loads(line)["text"] for line in p.read_text().splitlines()] if p.exists() else None
    return tokens, texts


# ---------------------------------------------------------------------------------------------- evaluation


def load_second_evaluator(inputs: dict, dev):
    """The second reference evaluator (`evaluator.second`, input "evaluator_second"); None where there is none."""
    if "evaluator_second" not in inputs:
        return None
    return load_evaluator(str(Path(inputs["evaluator_second"]) / "hf"), device=str(dev))


def load_study_evaluator(config: dict, inputs: dict, dev):
    ev = config["evaluator"]
    if ev["kind"] == "reference":
        return load_evaluator(str(Path(inputs["evaluator"]) / "hf"), device=str(dev))
    if ev["kind"] == "hf":
        return load_evaluator(ev["name"], device=str(dev))
    return None


def _metric_kwargs(config: dict, evaluator, references, corpus) -> dict:
    m = config["metrics"]
    eos = getattr(corpus.tokenizer, "eos_token", None) if corpus.tokenizer is not None else None
    markers = END_MARKERS + ((eos,) if eos and eos not in END_MARKERS else ())
    return dict(
        evaluator=evaluator,
        references=references,
        mauve_featurizer=m["mauve_featurizer"],
        mauve_num_buckets=m["mauve_buckets"],
        mauve_seeds=m.get("mauve_seeds", 5),
        self_bleu_subsample=m["self_bleu_subsample"],
        seed=config["seed"],
        end_markers=markers,
        train_tokens=corpus.train,  # a reference, not a copy: read only by metrics that need "train"
    )


def _sample_metric_names(config: dict, evaluator) -> list[str]:
    names = [n for n in config["metrics"]["names"] if n in SAMPLE_METRICS]
    if evaluator is None:
        names = [n for n in names if n not in ("gen_ppl", "gen_ppl_seq_mean")]
    return names


def content_length(tokens: np.ndarray, eos_id: int | None, lengths: np.ndarray | None = None) -> np.ndarray:
    """(N, L) ids -> (N,) tokens before the first EOS (L_i where a row has none in its first L_i = lengths[i]
    ids (default L), or without an EOS id)."""
    n, length = tokens.shape
    lens = np.full(n, length, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
    if eos_id is None:
        return lens
    is_eos = (tokens == eos_id) & (np.arange(length)[None, :] < lens[:, None])
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), lens).astype(np.int64)


def score_samples(
    config: dict, tokens: np.ndarray, texts, refs, evaluator, corpus, out_dir: Path, names, lengths=None, second=None
) -> dict:
    """The sample metrics of one sample set, recorded with what each saw, and the per-sample table.

    tokens (N, L) ids; lengths: optional (N,) content lengths (sample i is tokens[i, :lengths[i]], e.g. external
    texts shorter than L: the padding after it is scored by no metric); None: every sample fills L.

    Returns the payload part {"metrics", "metric_details"}: metrics holds the values, `n_samples`,
    `samples_per_metric` {name: samples the metric saw}, gen_ppl's scored tokens and truncated samples
    (`gen_ppl_n_tokens`, `gen_ppl_n_truncated`, likewise for gen_ppl_seq_mean) and MAUVE's `mauve_std` (over
    k-means seeds), `mauve_n` (per side) and `mauve_buckets`; metric_details holds everything else recorded
    (per-seed MAUVE values, featurizer weights hash, text convention). second: the second evaluator
    (`evaluator.second`) or None: gen_ppl under it is `gen_ppl_second` (same protocol, its per-sample columns
    suffixed `_second`). Writes out_dir/per_sample.csv: one row per sample (`fsdfm.records.load_samples`).
    """
    if names:
        kwargs = _metric_kwargs(config, evaluator, refs, corpus)
        ms = compute_metric_set(tokens, texts, names, lengths=lengths, **kwargs)
    else:  # only corpus metrics asked (e.g. `names: [oracle_nll]` of an oracle study without an evaluator)
        ms = MetricSet(values={}, n_samples={}, details={}, per_sample={})
    metrics, seen, columns2 = dict(ms.values), dict(ms.n_samples), {}
    if second is not None and "gen_ppl" in names:  # the same protocol under the second evaluator
        ms2 = compute_metric_set(tokens, texts, ["gen_ppl"], lengths=lengths, **{**kwargs, "evaluator": second})
        metrics["gen_ppl_second"] = ms2.values["gen_ppl"]
        metrics["gen_ppl_second_n_tokens"] = ms2.details["gen_ppl"]["n_tokens"]
        seen["gen_ppl_second"] = ms2.n_samples["gen_ppl"]
        columns2 = {f"{k}_second": v for k, v in ms2.per_sample.items()}
    for name in ("gen_ppl", "gen_ppl_seq_mean"):
        if name in ms.details:
            metrics[f"{name}_n_tokens"] = ms.details[name]["n_tokens"]
            metrics[f"{name}_n_truncated"] = ms.details[name]["n_truncated"]
    if "mauve" in ms.details:
        d = ms.details["mauve"]
        metrics.update(mauve_std=d["std"], mauve_n=d["n_per_side"], mauve_buckets=d["num_buckets"])
    extra = extra_metrics(config, tokens, corpus)
    metrics.update(extra.values)
    n = int(tokens.shape[0])
    metrics["samples_per_metric"] = {**seen, **{k: n for k in extra.values if k in extra.per_sample}}
    metrics["n_samples"] = n
    columns = {"sample": np.arange(n), "length": content_length(tokens, corpus.eos_id, lengths)}
    columns.update(ms.per_sample)
    columns.update(columns2)
    columns.setdefault("entropy_nats", entropy(tokens, lengths).per_sample)
    if tokens.shape[1] >= 4:
        columns.setdefault("rep_n", rep_n_per_sample(tokens, 4, lengths))
    columns.update(extra.per_sample)
    write_per_sample(Path(out_dir) / PER_SAMPLE, columns)
    return {"metrics": metrics, "metric_details": ms.details, "per_sample": PER_SAMPLE}


def score_with_study_evaluators(config: dict, inputs: dict, corpus, tokens, texts, out_dir: Path, lengths=None) -> dict:
    """`score_samples` under the study's evaluators (inputs "evaluator" and, with `evaluator.second`,
    "evaluator_second"), MAUVE against the first N held-out blocks (N = tokens.shape[0]): what every stage that
    scores a sample set (evaluate, evaluate_data, evaluate_external) does."""
    dev = device()
    evaluator = load_study_evaluator(config, inputs, dev)
    refs = corpus.texts("valid", int(tokens.shape[0])) if corpus.tokenizer is not None else None
    names = _sample_metric_names(config, evaluator)
    second = load_second_evaluator(inputs, dev)
    return score_samples(config, tokens, texts, refs, evaluator, corpus, out_dir, names, lengths, second=second)


@stage_kind(
    "evaluate",
    resources="gpu",
    version="1",
    metrics=lambda c: corpus_metric_names(c),
    sources=(
        "fsdfm.methods.evaluate:evaluate_stage",
        *DATA_SOURCES,
        *EVAL_SOURCES,
        "fsdfm.methods.evaluate:read_samples",
    ),
)
def evaluate_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """All sample metrics of one sample stage (evaluator time is not sampling time), and the per-sample table."""
    corpus = corpus_for(config, out_dir)
    tokens, texts = read_samples(inputs["samples"])
    n = config["n_samples"]
    if tokens.shape[0] != n:
        raise RuntimeError(f"{inputs['samples']}: {tokens.shape[0]} samples on disk, {n} requested")
    scored = score_with_study_evaluators(config, inputs, corpus, tokens, texts, out_dir)
    sample_rec = read_record(Path(inputs["samples"])) or {}
    scored["metrics"].update(
        (sample_rec.get("payload") or {}).get("metrics") or {}
    )  # nfe, wall_s, tokens_per_s, peak_mem
    return {**scored, "n_samples": n, "samples_stage": Path(inputs["samples"]).name}


@stage_kind(
    "evaluate_data",
    resources="gpu",
    version="1",
    metrics=lambda c: corpus_metric_names(c),
    sources=(
        "fsdfm.methods.evaluate:evaluate_data_stage",
        *DATA_SOURCES,
        *EVAL_SOURCES,
        "fsdfm.metrics.sample:data_reference",
    ),
)
def evaluate_data_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The data reference row: the same metrics on real held-out blocks (a disjoint set is the MAUVE reference)."""
    corpus = corpus_for(config, out_dir)
    n = config["n_samples"]
    if corpus.valid.shape[0] < 2 * n:
        raise RuntimeError(
            f"the data reference row needs {2 * n} held-out blocks; the valid split has {corpus.valid.shape[0]}"
        )
    tokens = corpus.valid[n : 2 * n].numpy()
    texts = corpus.texts("valid", 2 * n)[n:] if corpus.tokenizer is not None else None  # decode only what is used
    return {**score_with_study_evaluators(config, inputs, corpus, tokens, texts, out_dir), "n_samples": n}


@stage_kind(
    "pos_divergence",
    resources="gpu",
    version="1",
    metrics=("pos_divergence", "pos_divergence_slope"),
    sources=(
        "fsdfm.methods.evaluate:pos_divergence_stage",
        *DATA_SOURCES,
        "fsdfm.samplers",
        "fsdfm.sparse_step",
        "fsdfm.methods.common:load_dit",
    ),
)
def pos_divergence_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Per-position divergence of the few-step student from the many-step teacher, from states x_t taken
    along teacher trajectories at t_start: both finish from the same state; marginals from rollouts."""
    corpus = corpus_for(config, out_dir)
    dev = device()
    teacher, student = load_dit(inputs["teacher"], dev), load_dit(inputs["student"], dev)
    precision = getattr(torch, config["precision"])
    t0 = config["t_start"]
    gen = torch.Generator(dev).manual_seed(config["seed"])
    n_pre = max(1, round(config["teacher_steps"] * t0))
    pre = torch.linspace(0.0, t0, n_pre + 1, dtype=torch.float64)
    # Reach x_{t_start} on teacher trajectories: run the teacher's own steps up to t_start, without the final draw.
    x = teacher.path.source.sample((config["n_states"], corpus.seq_len), generator=gen, device=dev)
    for i in range(n_pre):
        t, h = pre[i].expand(len(x)).to(dev), (pre[i + 1] - pre[i]).expand(len(x)).to(dev)
        p = torch.softmax(teacher.model(x, t.float()).to(precision), -1)
        x = update(x, p, t, h, get_rule("cumulative_scalar"), teacher.path, gen)

    def rollout(m: LoadedDiT, n_steps: int) -> Callable:
        grid = time_grid(n_steps, t_start=t0)

        def go(x_start, g):
            return sample(
                m.model,
                m.path,
                n_samples=len(x_start),
                seq_len=corpus.seq_len,
                grid=grid,
                rule="cumulative_scalar",
                h_conditioned=m.h_conditioned,
                generator=g,
                precision=precision,
                device=dev,
                x_init=x_start,
            ).tokens

        return go

    n_teacher = max(1, round(config["teacher_steps"] * (1 - t0)))
    n_student = max(1, round(config["student_steps"] * (1 - t0)))
    res = pos_divergence(
        x.cpu(),
        rollout(teacher, n_teacher),
        rollout(student, n_student),
        config["n_rollouts"],
        corpus.vocab_size,
        generator=gen,
    )
    return {
        "metrics": {
            "pos_divergence": float(res.tv.mean()),
            "pos_divergence_slope": res.slope,
            "pos_divergence_slope_stderr": res.slope_stderr,
            "pos_agreement": float(res.agreement.mean()),
            "student_nfe_from_t_start": n_student,
        },
        "curves": {"tv": res.tv.tolist(), "js": res.js.tolist(), "agreement": res.agreement.tolist()},
        "teacher_steps_from_t_start": n_teacher,
        "student_steps_from_t_start": n_student,
    }
