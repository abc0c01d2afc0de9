"""The Python API: run a study, load a trained model and sample it, score samples -- from a notebook.

    import fsdfm
    df = fsdfm.run_study("experiments/demo.yaml", overrides={"sampling.n_samples": 8})   # the results DataFrame
    m = fsdfm.load_model("results/demo/stages/distil_fsdfm-<id>")                        # a training stage folder
    s = m.sample(16, steps=8, rule="cumulative_scalar", seed=0)                          # Samples: ids and texts
    fsdfm.evaluate(s, metrics=["entropy_nats", "rep_n"])                                 # a MetricSet

Everything goes through the code paths of the command line: `run_study` validates a dict exactly like a YAML file
(`fsdfm.methods.load.load_spec_dict`, overrides applied first) and runs the same plan with the same executors;
`Model.sample` calls the sampler the study's sample stage calls (`fsdfm.methods.common.SAMPLERS`) with the same
settings, so the same seed gives the same tokens; `evaluate` is `fsdfm.metrics.compute_metric_set`.

A model folder is self-contained: every training stage saves the corpus tokenizer beside its weights
(`tokenizer.json`), and its record says how it was trained (the default end of the time grid follows from it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from fsdfm.launch import execute
from fsdfm.records import data_cache_dir, load, read_record, stage_cache_dir
from fsdfm.registry import did_you_mean
from fsdfm.launch.backfill import backfill_tracking
from fsdfm.study.graph import STAGE_KINDS
from fsdfm.tracking import check_available, enable

DEFAULT_ROOT = "results"
TOKENIZER_FILE = "tokenizer.json"


def model_stage_kinds() -> dict:
    """{stage kind: (sampler, default rule)} of the stage kinds that leave a model in their folder, as each
    declares it (`@stage_kind(..., model_sampler=, model_rule=)`); every kind found by discovery."""
    import fsdfm.methods  # noqa: F401  (heavy: torch; finds every method and stage kind)

    out = {}
    for name in STAGE_KINDS.names():
        k = STAGE_KINDS.get(name)
        if k.model_sampler is not None:
            out[name] = (k.model_sampler, k.model_rule)
    return out


class StudyFailed(RuntimeError):
    """`run_study` finished with failed or blocked stages; `summary` is the executor's ExecutionSummary."""

    def __init__(self, summary):
        self.summary = summary
        super().__init__(f"study {summary.study_dir} did not complete:\n{summary.format()}")


# ------------------------------------------------------------------------------------------------ run_study


def resolve_spec(spec, overrides, limit, results, check_files: bool = True):
    """The resolved spec (fsdfm.study.load.ResolvedSpec) of a spec file or mapping, with overrides and limit,
    checked against the method kinds (`fsdfm.methods.load`); the data checks may reuse (never write) the
    tokenizers a previous run cached under the results root `results`. The command line resolves through here."""
    from fsdfm.methods.load import load as load_file, resolve  # heavy: torch (the method kinds)

    cache = data_cache_dir(results)
    if isinstance(spec, Mapping):
        return resolve(spec, "<spec dict>", None, overrides, limit, cache_dir=cache, check_files=check_files)
    return load_file(spec, overrides, limit, cache_dir=cache, check_files=check_files)


def study_path(
    spec: str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    limit: int | None = None,
    results: str | os.PathLike = DEFAULT_ROOT,
) -> Path:
    """The folder of the study `run_study(spec, overrides, limit=limit, results=results)` runs: the one that
    `fsdfm run SPEC KEY=VALUE... --limit N --results R` writes (one naming rule, `fsdfm.study.load.resolve`).
    Reads the spec only (no data checks); writes nothing."""
    return Path(results) / resolve_spec(spec, overrides, limit, results, check_files=False).name


def run_study(
    spec: str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    executor: str = "inline",
    results: str | os.PathLike = DEFAULT_ROOT,
    profile: str | None = None,
    max_parallel: int | None = None,
    track: bool = False,
    limit: int | None = None,
):
    """Run (or finish) a study and return its results DataFrame, as `fsdfm run` then `fsdfm.records.load`.

    The study lands where `fsdfm run SPEC KEY=VALUE... --limit N` puts it (`fsdfm.study.load.resolve`, one naming
    rule): results/<name> without overrides or limit, else results/<name>+<overrides> (e.g. demo+seed-3).

    Args:
        spec: a spec file, or the spec as a dict (what `yaml.safe_load` of the file gives), validated the same way.
        overrides: dotted key -> value applied before validation, e.g. {"seed": 3, "methods.fsdfm.distill.K": 8}
            (`fsdfm.study.load.apply_overrides`; a bad one is a SpecError naming it).
        executor: "inline" (default: this process, progress bars), "debug", "local" (one process per stage) or
            "slurm" (with `profile`; waits for the jobs).
        results: the results root; the study lands in results/<study name> (above).
        limit: as `fsdfm run --limit N`: N samples per run, training as the spec's `limit:` section says.
        track: log to the tracker of the spec's `tracking:` section (TensorBoard by default), as `fsdfm run --track`.
    Returns:
        pandas.DataFrame, one row per run whose final stage is done (`fsdfm.records.load`).
    Raises:
        SpecError (bad spec or override), StudyFailed (a stage failed or was blocked; nothing is hidden).
    """
    import fsdfm.methods  # noqa: F401  (heavy: torch; registers the method and stage kinds)
    from fsdfm.methods import plan_study  # heavy: torch

    r = resolve_spec(spec, overrides, limit, results)
    study = r.spec
    plan = plan_study(r.name, r.cells)
    if track:
        plan = enable(plan, study.tracking)
    check_available(plan.tracking)  # a missing tensorboard fails here, before anything runs
    summary = execute(plan, results, executor=executor, profile=profile, max_parallel=max_parallel)
    if not summary.ok:
        raise StudyFailed(summary)
    if plan.tracking and summary.skipped:  # finished before tracking was on: log what their records keep
        backfill_tracking(plan.to_dict(), Path(results) / r.name, summary.skipped)
    return load(Path(results) / r.name)


# ------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class Samples:
    """What `Model.sample` drew.

    tokens: (n, L) int64 token ids. texts: their decoded texts (None without a tokenizer, e.g. oracle data).
    nfe: network evaluations per sample; wall_s: sampling time (warm-up excluded); steps, rule, seed: as asked.
    """

    tokens: Any
    texts: list | None
    nfe: int
    wall_s: float
    steps: int
    rule: str
    seed: int


@dataclasses.dataclass(frozen=True)
class _ModelCorpus:
    """The four things a sampler asks of a corpus (fsdfm.methods.common.SAMPLERS), without the data."""

    seq_len: int
    vocab_size: int
    eos_id: int | None
    tokenizer: Any


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained model in a stage folder: `sample(...)` draws from it with the study's samplers.

    stage_dir: the folder; kind: its stage kind; sampler: the SAMPLERS entry; seq_len, vocab_size: L and V;
    tokenizer: a fsdfm.data.TextTokenizer or None; config: the stage's config from its record ({} without one);
    t_end: the default end of the time grid (1 - eps for a generalized-KL teacher, else 1).
    """

    stage_dir: Path
    kind: str
    sampler: str
    seq_len: int
    vocab_size: int
    tokenizer: Any = dataclasses.field(repr=False)
    config: dict = dataclasses.field(repr=False, default_factory=dict)
    t_end: float = 1.0

    def sample(
        self,
        n: int,
        steps: int = 8,
        rule: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        precision: str = "float64",
        t_end: float | None = None,
        device: str | None = None,
        forward_precision: str = "float32",
    ) -> Samples:
        """Draw n samples with `steps` steps of update rule `rule` (default: the method's first rule).

        With the settings of a study's sample stage (n_samples, steps, rule, seed, batch_size, precision,
        forward_precision (float32, or bfloat16: the network under bf16 autocast), and the t_end the planner chose, which is the default here) the tokens are those of that stage.
        Returns: Samples with tokens (n, L) int64 and, with a tokenizer, the decoded texts.
        """
        import torch  # heavy: `import fsdfm` stays light for the command line

        from fsdfm.methods.common import draw_samples  # heavy: torch

        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"sample: steps must be a positive integer, got {steps!r}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"sample: precision must be float64 or float32, got {precision!r}")
        if forward_precision not in ("float32", "bfloat16"):
            raise ValueError(f"sample: forward_precision must be float32 or bfloat16, got {forward_precision!r}")
        rule = rule or model_stage_kinds()[self.kind][1]
        if self.sampler == "dfm" or self.sampler == "exact":
            from fsdfm.samplers import get_rule  # heavy: torch

            get_rule(rule)  # an unknown rule: UnknownNameError with did-you-mean
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = {
            "sampler": self.sampler,
            "rule": rule,
            "steps": steps,
            "t_end": self.t_end if t_end is None else t_end,
            "n_samples": n,
            "batch_size": batch_size or min(n, 64),
            "seed": seed,
            "precision": precision,
            "forward_precision": forward_precision,
            "data": self.config.get("data", {}),
        }
        corpus = _ModelCorpus(
            self.seq_len, self.vocab_size, self.tokenizer.eos_id if self.tokenizer else None, self.tokenizer
        )
        gen = torch.Generator(dev).manual_seed(seed)  # as the sample stage seeds it
        out = draw_samples(self.sampler, self.stage_dir, cfg, corpus, dev, gen)
        tokens = out.tokens.cpu().numpy().astype(np.int64)
        texts = self.tokenizer.decode_batch(tokens.tolist()) if self.tokenizer is not None else None
        return Samples(
            tokens=tokens,
            texts=texts,
            nfe=int(out.nfe),
            wall_s=float(out.wall_s),
            steps=steps,
            rule=cfg["rule"],
            seed=seed,
        )


def _model_dims(d: Path, sampler: str, record: dict) -> tuple[int, int]:
    """(seq_len, vocab_size) of the model in folder d."""
    if sampler == "ar":
        cfg = json.loads((d / "hf" / "config.json").read_text())
        return int(cfg["n_positions"]) - 1, int(cfg["vocab_size"])  # n_positions = L + 1 (the BOS position)
    if sampler == "exact":  # the source knows its vocabulary (a user's file source has no vocab_size key)
        from fsdfm.data import DataConfig, oracle_source  # heavy: torch

        data = record["config"]["data"]
        return int(data["seq_len"]), int(oracle_source(DataConfig(**data)).vocab_size)
    if (d / "released.json").exists():
        ptr = json.loads((d / "released.json").read_text())
        data = record.get("config", {}).get("data", {})
        return int(data.get("seq_len") or ptr["model_config"]["seq_len"]), int(ptr["model_config"]["vocab_size"])
    from fsdfm.methods.common import load_dit  # heavy: torch

    model = load_dit(d, dev=None).model
    return int(model.cfg.seq_len), int(model.cfg.vocab_size)


def _model_tokenizer(d: Path, record: dict):
    """tokenizer.json beside the model; for folders written before tokenizers were saved there, the tokenizer the
    record's data config builds (from the data cache); None for data without one."""
    from fsdfm.data.tokenizer import tokenizer_from_file  # heavy: torch

    if (d / TOKENIZER_FILE).is_file():
        return tokenizer_from_file(d / TOKENIZER_FILE, name=str(d / TOKENIZER_FILE))
    data = (record.get("config") or {}).get("data")
    if not data or data.get("kind") in ("oracle",) or data.get("tokenizer") == "none":
        return None
    from fsdfm.data import DataConfig, load_corpus  # heavy: torch

    return load_corpus(DataConfig(**data), stage_cache_dir(d)).tokenizer


def load_model(stage_dir: str | os.PathLike) -> Model:
    """The trained model of a training stage folder (train_dfm, distil_fsdfm, train_ar, train_flm, distil_fmlm,
    load_released, exact_posterior), ready to `sample`.

    Raises: FileNotFoundError / ValueError naming the folder when it holds no finished model.
    """
    d = Path(stage_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"load_model: {d}: no such stage folder")
    record = read_record(d) or {}
    kind = record.get("kind") or d.name.rsplit("-", 1)[0]
    models = model_stage_kinds()
    if kind not in models:
        raise ValueError(
            f"load_model: {d} is a {kind!r} stage, which holds no model{did_you_mean(kind, list(models))}; "
            f"pass the folder of one of: {', '.join(models)}"
        )
    if record.get("status") != "done":
        raise FileNotFoundError(f"load_model: {d}: the stage has not finished (no done record.json)")
    sampler = models[kind][0]
    config = record.get("config") or {}
    seq_len, vocab_size = _model_dims(d, sampler, record)
    objective = config.get("objective") or {}
    # the planner ends the grid at 1 - eps for a generalized-KL teacher (fsdfm.methods: ends_before_one); a released
    # checkpoint's record does not say how it was trained: pass t_end to sample() for a generalized-KL one
    t_end = 1.0 - float(objective.get("eps", 1e-3)) if objective.get("loss") == "gkl" else 1.0
    return Model(
        stage_dir=d,
        kind=kind,
        sampler=sampler,
        seq_len=seq_len,
        vocab_size=vocab_size,
        tokenizer=_model_tokenizer(d, record),
        config=config,
        t_end=t_end,
    )


# ------------------------------------------------------------------------------------------------ evaluate

DEFAULT_METRICS = ("entropy_nats", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu", "rep_n")


def _as_tokenizer(tokenizer):
    if tokenizer is None or hasattr(tokenizer, "decode_batch"):
        return tokenizer
    if isinstance(tokenizer, Model):
        return tokenizer.tokenizer
    from fsdfm.data.tokenizer import load_tokenizer  # heavy: torch

    return load_tokenizer(str(tokenizer))


def evaluate(
    samples,
    metrics: Sequence[str] | None = None,
    reference: Sequence[str] | None = None,
    evaluator=None,
    tokenizer=None,
    seed: int = 0,
    mauve_featurizer: str = "minilm",
    self_bleu_subsample: int | None = 1000,
    device: str = "cpu",
):
    """Score samples with the suite's metrics (`fsdfm.metrics.compute_metric_set`).

    Args:
        samples: a `Samples`; an (N, L) array / tensor / nested list of token ids; or a list of N texts.
        metrics: metric names (default: entropy_nats, distinct_1..4, self_bleu, rep_n; plus gen_ppl with an
            evaluator and mauve with a reference).
        reference: real texts for MAUVE (as many as samples).
        evaluator: an HF causal LM for gen_ppl: a folder (e.g. <train_ar stage>/hf), a cached hub name, or an
            Evaluator from fsdfm.metrics.evaluator.load_evaluator.
        tokenizer: decodes ids to texts / encodes texts to ids: a TextTokenizer, a Model, "gpt2", or a path to a
            tokenizer.json (or its folder). Texts of different token lengths are padded with EOS to the longest.
    Returns:
        MetricSet: values {name: float}, n_samples {name: samples seen}, details, per_sample {column: (N,) array}.
    """
    from fsdfm.metrics import compute_metric_set  # heavy: torch
    from fsdfm.metrics.texts import END_MARKERS  # heavy: torch

    tok = _as_tokenizer(tokenizer)
    if isinstance(samples, Samples):
        ids, texts = samples.tokens, samples.texts
        if texts is None and tok is not None:
            texts = tok.decode_batch(np.asarray(ids).tolist())
    elif isinstance(samples, (list, tuple)) and samples and all(isinstance(x, str) for x in samples):
        texts = list(samples)
        if tok is None:
            raise ValueError("evaluate: texts need a tokenizer (tokenizer=...) for the metrics on token ids")
        encoded = tok.encode_batch(texts)
        width = max(2, max(len(e) for e in encoded))
        ids = np.array([e + [tok.eos_id] * (width - len(e)) for e in encoded], dtype=np.int64)
    else:
        ids, texts = samples, None
        if tok is not None:
            texts = tok.decode_batch(np.asarray(ids).tolist())
    if isinstance(evaluator, (str, os.PathLike)):
        from fsdfm.metrics.evaluator import load_evaluator  # heavy: torch

        evaluator = load_evaluator(evaluator, device=device)
    if metrics is None:
        metrics = (
            list(DEFAULT_METRICS)
            + (["gen_ppl"] if evaluator is not None else [])
            + (["mauve"] if reference is not None else [])
        )
    eos = getattr(tok, "eos_token", None) if tok is not None else None
    markers = END_MARKERS + ((eos,) if eos and eos not in END_MARKERS else ())
    return compute_metric_set(
        ids,
        texts,
        list(metrics),
        evaluator=evaluator,
        references=reference,
        mauve_featurizer=mauve_featurizer,
        self_bleu_subsample=self_bleu_subsample,
        seed=seed,
        end_markers=markers,
    )
