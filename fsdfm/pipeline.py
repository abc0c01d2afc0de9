"""The stage functions of a study: train, distil, sample, evaluate — plain functions `fn(config, inputs, out_dir)`.

Each is registered as a stage kind (fsdfm.stages) and returns its record's payload. Training stages save
checkpoints in out_dir/ckpt and resume from them (they are checkpointable on SLURM). Model artefacts:
    DiT methods   out_dir/model.pt  {"model_config", "state_dict" (EMA weights when EMA is on), "path", "h_conditioned"}
    released      out_dir/released.json  a pointer to the checkpoint file (the 1.3B weights are not copied)
    AR methods    out_dir/hf/       save_pretrained (model and tokenizer): the Hugging Face loading path
    FLM / FMLM    out_dir/model.pt  (see fsdfm.flm)
Samplers are looked up by name in SAMPLERS; nothing here branches on method names. Resource classes (mapped to
partitions/GPUs by a cluster profile): training stages "gpu_multi" (DDP when the profile gives several tasks),
sampling and evaluation "gpu".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.data import DataConfig, load_corpus
from fsdfm.metrics.oracle import corpus_metric_names, extra_metrics  # the oracle corpus metrics (registered there)
from fsdfm.model import DiT, ModelConfig, model_config, student_from_teacher
from fsdfm.objectives import FROZEN_TEACHER_SHORTCUTS, DFMConfig, DFMObjective, FSDFMObjective
from fsdfm.paths import MixturePath, make_path
from fsdfm.registry import Registry
from fsdfm.io import atomic_write
from fsdfm.samplers import SampleOutput, get_rule, sample, time_grid, update
from fsdfm.schedulers import make_scheduler
from fsdfm.stages import stage_kind
from fsdfm.train import OptimConfig, UnsafeCheckpointError, fit, load_weights, save_checkpoint

SAMPLERS: Registry = Registry("sampler")
LOSS_CURVE_POINTS = 200


# ---------------------------------------------------------------------------------------------- helpers

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir(out_dir: Path) -> Path:
    """Tokenizers and packed blocks are cached once per results root (or FSDFM_CACHE): fsdfm.records.cache."""
    from fsdfm.records import stage_cache_dir
    return stage_cache_dir(out_dir)


def corpus_for(config: dict, out_dir: Path):
    return load_corpus(DataConfig(**config["data"]), cache_dir(out_dir))


def build_model_config(model: dict, vocab_size: int, seq_len: int, **extra) -> ModelConfig:
    model = dict(model)
    return model_config(model.pop("preset"), vocab_size, seq_len, **{**model, **extra})


def loss_curve(losses: list[float]) -> list[float]:
    """At most LOSS_CURVE_POINTS window means of the loss history, for records and plots."""
    if not losses:
        return []
    k = max(1, len(losses) // LOSS_CURVE_POINTS)
    return [float(np.mean(losses[i:i + k])) for i in range(0, len(losses), k)]


def is_main_rank() -> bool:
    """True outside DDP and on rank 0: the one process that writes a training stage's model."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def join_process_group() -> None:
    """Multi-task jobs (SLURM tasks_per_node > 1, torchrun) train with DDP: ranks from the environment; a no-op
    for one process. `fit` then gives every rank its slice of the global batch."""
    from fsdfm.distributed import init_distributed
    init_distributed()


def path_from_config(path_cfg: dict, vocab_size: int) -> MixturePath:
    """The mixture path of a stored {"source", "scheduler": {"name", "n"}} config."""
    sched = path_cfg["scheduler"]
    kwargs = {"n": sched["n"]} if sched["name"] == "polynomial" else {}
    return make_path(make_scheduler(sched["name"], **kwargs), path_cfg["source"], vocab_size)


TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(out_dir: Path, corpus) -> None:
    """The corpus tokenizer beside the model a training stage writes (out_dir/tokenizer.json), so that a model
    folder decodes its own samples (fsdfm.api.load_model); nothing for data without a tokenizer."""
    if corpus.tokenizer is not None and is_main_rank():
        atomic_write(Path(out_dir) / TOKENIZER_FILE, corpus.tokenizer.backend.to_str().encode())


def save_dit(out_dir: Path, model: DiT, path_cfg: dict, h_conditioned: bool, corpus=None) -> None:
    if not is_main_rank():
        return
    if corpus is not None:
        save_tokenizer(out_dir, corpus)
    save_checkpoint(Path(out_dir) / "model.pt", {"model_config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                                                 "path": path_cfg, "h_conditioned": h_conditioned})


@dataclasses.dataclass(frozen=True)
class LoadedDiT:
    model: DiT
    path: MixturePath
    path_cfg: dict
    h_conditioned: bool


class ArtefactError(RuntimeError):
    """An input artefact (model.pt, samples.npy) that cannot be read: the message names the file."""


RELEASED_POINTER = "released.json"


def load_dit(model_dir: Path, dev: torch.device | None = None) -> LoadedDiT:
    if (Path(model_dir) / RELEASED_POINTER).exists():
        return load_released_dit(Path(model_dir) / RELEASED_POINTER, dev or device())
    path = Path(model_dir) / "model.pt"
    try:
        state = load_weights(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file raises OSError/RuntimeError/EOFError that name no file
        raise ArtefactError(f"{path}: cannot be read as a model ({type(e).__name__}: {e}); delete the stage "
                            "folder (fsdfm clean) or re-run the study, which redoes damaged stages") from e
    model = DiT(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["state_dict"])
    model.to(dev or device()).eval()
    pc = state["path"]
    if "source" not in pc:  # continuous-state models (FLM / FMLM) have no mixture path
        return LoadedDiT(model, None, pc, state["h_conditioned"])
    return LoadedDiT(model, path_from_config(pc, model.cfg.vocab_size), pc, state["h_conditioned"])


def load_released_dit(pointer_file: Path, dev: torch.device) -> LoadedDiT:
    """The model a load_released stage points to, refusing a checkpoint file that changed since (size, mtime)."""
    from fsdfm.checkpoints import CheckpointError, load_released

    ptr = json.loads(Path(pointer_file).read_text())
    stat = Path(ptr["checkpoint"]).stat() if Path(ptr["checkpoint"]).is_file() else None
    if stat is None or (stat.st_size, stat.st_mtime_ns) != (ptr["size_bytes"], ptr["mtime_ns"]):
        raise CheckpointError(f"{ptr['checkpoint']}: the checkpoint {pointer_file} points to is gone or changed since it "
                              f"was checked; re-run its load_released stage (delete {Path(pointer_file).parent})")
    loaded = load_released(ptr["checkpoint"], ptr["which"], device=dev)
    return LoadedDiT(loaded.model, path_from_config(ptr["path"], loaded.config.vocab_size), ptr["path"],
                     loaded.h_conditioned)


@torch.no_grad()
def dfm_validation(model: DiT, path: MixturePath, valid: torch.Tensor, eps: float, seed: int = 0,
                   n_batches: int = 8, batch_size: int = 32) -> dict:
    """Held-out CE on movable positions at t ~ U[0, 1 - eps] and, for the mask source, the ELBO bound
    val_nll = E_t[ g(t) sum_masked -log p(x_1 | x_t) ] / L (nats/token) and elbo_ppl = exp(val_nll)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    model.eval()
    ce_sum = ce_n = elbo = 0.0
    n_seq = 0
    dev = next(model.parameters()).device
    for b in range(n_batches):
        x_1 = valid[b * batch_size % max(1, len(valid)):][:batch_size].to(dev)
        if len(x_1) == 0:
            break
        t = torch.rand(len(x_1), device=dev, generator=g) * (1 - eps)
        ps = path.sample(x_1, t, g)
        logp = torch.log_softmax(model(ps.x_t, t).float(), -1).gather(-1, x_1[..., None]).squeeze(-1)
        w = path.source.movable(ps.x_t).float()
        ce_sum += float((-logp * w).sum())
        ce_n += float(w.sum())
        elbo += float((path.scheduler(t).rate[:, None] * (-logp) * w).sum())
        n_seq += len(x_1)
    out = {"val_ce": ce_sum / max(ce_n, 1.0)}
    if path.source.name == "mask":
        out["val_nll"] = elbo / (n_seq * valid.shape[1])
        out["elbo_ppl"] = float(np.exp(out["val_nll"]))
    return out


def unigram_ce(train: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one-smoothed train unigram distribution on the valid tokens."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[valid.flatten()].mean())


def train_metrics(res, extra: dict | None = None) -> dict:
    return {"metrics": {"train_loss_final": float(np.mean(res.losses[-20:])), "train_wall_s": res.wall_s,
                        "train_tokens_per_s": res.tokens_per_s, **(extra or {})},
            "loss_curve": loss_curve(res.losses), "resumed_from": res.resumed_from}


# ---------------------------------------------------------------------------------------------- training stages

def _oracle_model_metric(config: dict) -> tuple:
    """posterior_kl, which a DiT training stage records on oracle data (`oracle_model_metrics`)."""
    return ("posterior_kl",) if (config.get("data") or {}).get("kind") == "oracle" else ()


@stage_kind("train_dfm", checkpointable=True, resources="gpu_multi", version="1",
            metrics=lambda c: (("val_nll", "elbo_ppl") if c.get("source") == "mask" else ()) + _oracle_model_metric(c))
def train_dfm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The DFM teacher: mask or uniform source, CE or generalized-KL loss."""
    join_process_group()
    corpus = corpus_for(config, out_dir)
    path = path_from_config(config, corpus.vocab_size)
    cfg = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len,
                             input_vocab_size=path.source.input_vocab_size)
    torch.manual_seed(config["optim"]["seed"])
    model = DiT(cfg)
    obj = DFMConfig(**config["objective"])
    objective = DFMObjective(path, obj)
    if "teacher" in inputs:  # teacher: exact -- the "exact targets" baseline (fsdfm.exact_teacher)
        from fsdfm.exact_teacher import ExactTargetObjective, load_exact
        objective = ExactTargetObjective(path, load_exact(inputs["teacher"], config["data"]), obj.eps)
    res = fit(model, objective, corpus.train, OptimConfig(**config["optim"]), Path(out_dir) / "ckpt",
              desc="train dfm teacher", device=device())
    final = res.ema if res.ema is not None else res.model
    val = dfm_validation(final, path, corpus.valid, obj.eps)
    save_dit(out_dir, final, {"source": config["source"], "scheduler": config["scheduler"]}, h_conditioned=False,
             corpus=corpus)
    return train_metrics(res, {**val, "unigram_ce": unigram_ce(corpus.train, corpus.valid, corpus.vocab_size),
                               "n_params": model.num_parameters(), **oracle_model_metrics(config, final, path, corpus)})


@stage_kind("distil_fsdfm", checkpointable=True, resources="gpu_multi", version="1", metrics=lambda c: _oracle_model_metric(c))
def distil_fsdfm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The FS-DFM student, initialised from the teacher with a fresh step-size embedding."""
    from fsdfm.methods import StudentSpec

    join_process_group()
    corpus = corpus_for(config, out_dir)
    spec = StudentSpec(**config["distill"])
    from fsdfm.exact_teacher import is_exact
    if is_exact(inputs["teacher"]):  # teacher: exact -- fresh student, exact posterior as frozen evaluator
        from fsdfm.exact_teacher import exact_path_cfg, load_exact
        exact = load_exact(inputs["teacher"], config["data"])
        path_cfg, teacher_path = exact_path_cfg(inputs["teacher"]), exact.path
        torch.manual_seed(config["optim"]["seed"])
        student = DiT(build_model_config(config["model"], corpus.vocab_size, corpus.seq_len, h_embedding=spec.h_embedding,
                                         input_vocab_size=teacher_path.source.input_vocab_size))
        frozen = exact
    else:
        teacher = load_dit(inputs["teacher"])
        path_cfg, teacher_path = teacher.path_cfg, teacher.path
        torch.manual_seed(config["optim"]["seed"])
        student = student_from_teacher(teacher.model, spec.h_embedding)
        frozen = teacher.model.requires_grad_(False) if spec.shortcut in FROZEN_TEACHER_SHORTCUTS else None
    res = fit(student, FSDFMObjective(teacher_path, spec.objective(), frozen), corpus.train,
              OptimConfig(**config["optim"]), Path(out_dir) / "ckpt", desc="distil fs-dfm student", device=device())
    final = res.ema if res.ema is not None else res.model
    save_dit(out_dir, final, path_cfg, h_conditioned=True, corpus=corpus)
    return train_metrics(res, {"n_params": student.num_parameters(),
                               **oracle_model_metrics(config, final, teacher_path, corpus, h=2.0 ** -spec.K)})


@stage_kind("train_ar", checkpointable=True, resources="gpu_multi", version="1", metrics=("val_nll", "elbo_ppl"))
def train_ar_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """An autoregressive GPT-2-style model (the AR baseline, or the suite's reference evaluator), saved with
    save_pretrained together with the corpus tokenizer."""
    from fsdfm.ar import ARConfig, train_ar

    join_process_group()
    corpus = corpus_for(config, out_dir)
    dims = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len)
    cfg = ARConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, hidden=dims.hidden, n_blocks=dims.n_blocks,
                   n_heads=dims.n_heads)
    torch.manual_seed(config["optim"]["seed"])
    hf_tok = corpus.tokenizer.to_hf() if corpus.tokenizer is not None else None
    res = train_ar(corpus.train, cfg, OptimConfig(**config["optim"]), Path(out_dir), bos_id=corpus.eos_id or 0,
                   hf_tokenizer=hf_tok, valid=corpus.valid, device=device())
    save_tokenizer(out_dir, corpus)
    return train_metrics(res.fit, {"val_nll": res.val_nll, "elbo_ppl": float(np.exp(res.val_nll)),
                                   "n_params": res.n_params})


@stage_kind("train_flm", checkpointable=True, resources="gpu_multi", version="1")
def train_flm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """FLM: a DiT reading the noisy one-hot state x_gamma, trained with CE at tau ~ U[0, 1]."""
    from fsdfm.flm import FLMConfig, FLMObjective, FLMTime

    join_process_group()
    corpus = corpus_for(config, out_dir)
    cfg = build_model_config(config["model"], corpus.vocab_size, corpus.seq_len)
    torch.manual_seed(config["optim"]["seed"])
    model = DiT(cfg)
    res = fit(model, FLMObjective(FLMTime(corpus.vocab_size), FLMConfig(**config["flm"])), corpus.train,
              OptimConfig(**config["optim"]), Path(out_dir) / "ckpt", desc="train flm", device=device())
    final = res.ema if res.ema is not None else res.model
    save_dit(out_dir, final, {"continuous": "flm"}, h_conditioned=False, corpus=corpus)
    return train_metrics(res, {"n_params": model.num_parameters()})


@stage_kind("distil_fmlm", checkpointable=True, resources="gpu_multi", version="1")
def distil_fmlm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """FMLM: the two-time flow-map denoiser distilled from a frozen FLM teacher by the semigroup rule."""
    from fsdfm.flm import FLMTime
    from fsdfm.fmlm import FMLMConfig, FMLMObjective, fmlm_student

    join_process_group()
    corpus = corpus_for(config, out_dir)
    teacher = load_dit(inputs["teacher"])
    torch.manual_seed(config["optim"]["seed"])
    student = fmlm_student(teacher.model)
    obj = FMLMObjective(teacher.model.requires_grad_(False), FLMTime(corpus.vocab_size), FMLMConfig(**config["fmlm"]))
    res = fit(student, obj, corpus.train, OptimConfig(**config["optim"]), Path(out_dir) / "ckpt",
              desc="distil fmlm", device=device())
    final = res.ema if res.ema is not None else res.model
    save_dit(out_dir, final, {"continuous": "fmlm"}, h_conditioned=True, corpus=corpus)
    return train_metrics(res, {"n_params": student.num_parameters()})


@stage_kind("load_released", resources="gpu", version="1")
def load_released_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """A released apple/ml-fs-dfm checkpoint as the model of a method, no training: load it once (every name and
    shape checked by fsdfm.checkpoints), check its vocabulary against the corpus, write a pointer to it."""
    from fsdfm.checkpoints import CheckpointError, load_released

    corpus = corpus_for(config, out_dir)
    ckpt = config["checkpoint"]
    file = Path(ckpt["path"]).resolve()
    loaded = load_released(file, ckpt["which"])
    h_wanted = ckpt["which"] != "teacher"
    if loaded.h_conditioned != h_wanted:
        raise CheckpointError(f"{file} [{loaded.source_key!r}]: which={ckpt['which']!r} expects a model "
                              f"{'with' if h_wanted else 'without'} step-size conditioning")
    if loaded.config.vocab_size != corpus.vocab_size or loaded.config.seq_len < corpus.seq_len:
        raise CheckpointError(f"{file}: the model has V = {loaded.config.vocab_size}, L <= {loaded.config.seq_len}; "
                              f"the corpus V = {corpus.vocab_size}, L = {corpus.seq_len}: they must agree")
    stat = file.stat()
    pointer = {"checkpoint": str(file), "which": ckpt["which"], "source_key": loaded.source_key,
               "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "model_config": loaded.config.to_dict(),
               "path": {"source": config["source"], "scheduler": config["scheduler"]},
               "h_conditioned": loaded.h_conditioned}
    atomic_write(Path(out_dir) / RELEASED_POINTER, json.dumps(pointer, indent=1).encode())
    save_tokenizer(out_dir, corpus)
    return {"metrics": {"n_params": loaded.model.num_parameters()}, "checkpoint": pointer}


# ---------------------------------------------------------------------------------------------- sampling

@SAMPLERS.register("dfm")
def sample_dfm(model_dir: Path, cfg: dict, corpus, dev, generator) -> SampleOutput:
    m = load_dit(model_dir, dev)
    grid = time_grid(cfg["steps"], t_end=cfg["t_end"])
    precision = getattr(torch, cfg["precision"])

    def run(n, steps_grid, gen):
        return sample(m.model, m.path, n_samples=n, seq_len=corpus.seq_len, grid=steps_grid, rule=cfg["rule"],
                      h_conditioned=m.h_conditioned, generator=gen, precision=precision,
                      batch_size=cfg["batch_size"], device=dev)

    run(min(cfg["batch_size"], cfg["n_samples"]), time_grid(1, t_end=cfg["t_end"]), torch.Generator(dev).manual_seed(0))  # warm-up
    return run(cfg["n_samples"], grid, generator)


@stage_kind("exact_posterior", resources="cpu", version="1")
def exact_posterior_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The exact denoiser of an oracle source (fsdfm.exact_teacher): nothing to train; records its path."""
    from fsdfm.data import DataConfig, oracle_source
    from fsdfm.exact_teacher import write_exact

    oracle_source(DataConfig(**config["data"]))  # a bad oracle config fails here, with a clear DataError
    write_exact(Path(out_dir), {"source": config["source"], "scheduler": config["scheduler"]})
    return {"metrics": {}}


@SAMPLERS.register("exact")
def sample_exact(model_dir: Path, cfg: dict, corpus, dev, generator) -> SampleOutput:
    """The exact posterior sampled by the DFM sampling loop (same rules, grids and precision as a network)."""
    from fsdfm.exact_teacher import load_exact

    exact = load_exact(model_dir, cfg["data"])
    grid = time_grid(cfg["steps"], t_end=cfg["t_end"])
    return sample(exact, exact.path, n_samples=cfg["n_samples"], seq_len=corpus.seq_len, grid=grid, rule=cfg["rule"],
                  generator=generator, precision=getattr(torch, cfg["precision"]), batch_size=cfg["batch_size"],
                  device=dev)


@SAMPLERS.register("ar")
def sample_ar_model(model_dir: Path, cfg: dict, corpus, dev, generator) -> SampleOutput:
    from transformers import AutoModelForCausalLM

    from fsdfm.ar import sample_ar

    model = AutoModelForCausalLM.from_pretrained(Path(model_dir) / "hf").to(dev).eval()
    kw = dict(seq_len=corpus.seq_len, bos_id=corpus.eos_id or 0, use_cache=True, batch_size=cfg["batch_size"],
              dtype=getattr(torch, cfg["precision"]))
    sample_ar(model, min(2, cfg["n_samples"]), generator=torch.Generator(dev).manual_seed(0), **{**kw, "seq_len": 4})
    return sample_ar(model, cfg["n_samples"], generator=generator, **kw)


def _continuous_sampler(two_time: bool) -> Callable:
    def run(model_dir: Path, cfg: dict, corpus, dev, generator) -> SampleOutput:
        from fsdfm.flm import FLMTime, sample_continuous

        m = load_dit(model_dir, dev)
        time = FLMTime(corpus.vocab_size)
        net = (lambda x, s, t: m.model(x, s, t)) if two_time else (lambda x, s, t: m.model(x, s))
        kw = dict(seq_len=corpus.seq_len, precision=getattr(torch, cfg["precision"]), device=dev,
                  max_state_bytes=cfg.get("max_state_bytes", 1 << 28))
        sample_continuous(net, time, n_samples=min(2, cfg["n_samples"]), n_steps=1, seed=0, **kw)  # warm-up
        return sample_continuous(net, time, n_samples=cfg["n_samples"], n_steps=cfg["steps"], seed=cfg["seed"], **kw)
    return run


SAMPLERS.register("flm", _continuous_sampler(two_time=False))
SAMPLERS.register("fmlm", _continuous_sampler(two_time=True))


@stage_kind("sample", resources="gpu", version="1", metrics=("nfe", "wall_s", "tokens_per_s", "peak_mem"))
def sample_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Draw n_samples from a trained method; record tokens, decoded text, NFE, wall-clock and peak memory."""
    from fsdfm.metrics.timing import peak_memory, reset_peak_memory

    corpus = corpus_for(config, out_dir)
    dev = device()
    gen = torch.Generator(dev).manual_seed(config["seed"])
    reset_peak_memory(dev)
    out = SAMPLERS.get(config["sampler"])(inputs["model"], config, corpus, dev, gen)
    peak, peak_kind = peak_memory(dev)
    tokens = out.tokens.cpu().numpy().astype(np.int64)
    if tokens.shape != (config["n_samples"], corpus.seq_len):
        raise RuntimeError(f"sampler returned {tokens.shape}, expected {(config['n_samples'], corpus.seq_len)}")
    write_samples(Path(out_dir), tokens, corpus)
    n_tok = tokens.size
    return {"metrics": {"nfe": out.nfe, "wall_s": out.wall_s, "tokens_per_s": n_tok / out.wall_s if out.wall_s > 0 else None,
                        "peak_mem": peak}, "peak_mem_kind": peak_kind, "device": str(dev),
            "precision": config["precision"], "time_grid": [float(t) for t in out.time_grid[:2049]],
            "numerics": out.numerics.to_dict() if getattr(out, "numerics", None) else None}


def write_samples(out_dir: Path, tokens: np.ndarray, corpus) -> None:
    """samples.npy (token ids) and samples.jsonl (decoded text), each written atomically."""
    import io
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
        raise ArtefactError(f"{path}: cannot be read as samples ({type(e).__name__}: {e}); re-run the study, "
                            "which redoes damaged stages") from e
    p = Path(stage_dir) / "samples.jsonl"
    texts = [json.loads(line)["text"] for line in p.read_text().splitlines()] if p.exists() else None
    return tokens, texts


# ---------------------------------------------------------------------------------------------- evaluation

def load_study_evaluator(config: dict, inputs: dict, dev):
    from fsdfm.metrics.evaluator import load_evaluator
    ev = config["evaluator"]
    if ev["kind"] == "reference":
        return load_evaluator(str(Path(inputs["evaluator"]) / "hf"), device=str(dev))
    if ev["kind"] == "hf":
        return load_evaluator(ev["name"], device=str(dev))
    return None


def _metric_kwargs(config: dict, evaluator, references, corpus) -> dict:
    from fsdfm.metrics.texts import END_MARKERS

    m = config["metrics"]
    eos = getattr(corpus.tokenizer, "eos_token", None) if corpus.tokenizer is not None else None
    markers = END_MARKERS + ((eos,) if eos and eos not in END_MARKERS else ())
    return dict(evaluator=evaluator, references=references, mauve_featurizer=m["mauve_featurizer"],
                mauve_num_buckets=m["mauve_buckets"], mauve_seeds=m.get("mauve_seeds", 5),
                self_bleu_subsample=m["self_bleu_subsample"], seed=config["seed"], end_markers=markers)


def _sample_metric_names(config: dict, evaluator) -> list[str]:
    from fsdfm.metrics import SAMPLE_METRICS
    names = [n for n in config["metrics"]["names"] if n in SAMPLE_METRICS]
    if evaluator is None:
        names = [n for n in names if n not in ("gen_ppl", "gen_ppl_seq_mean")]
    return names


def content_length(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """(N, L) ids -> (N,) tokens before the first EOS (L where a row has none, or without an EOS id)."""
    n, length = tokens.shape
    if eos_id is None:
        return np.full(n, length, dtype=np.int64)
    is_eos = tokens == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), length).astype(np.int64)


def score_samples(config: dict, tokens: np.ndarray, texts, refs, evaluator, corpus, out_dir: Path, names) -> dict:
    """The sample metrics of one sample set, recorded with what each saw, and the per-sample table.

    Returns the payload part {"metrics", "metric_details"}: metrics holds the values, `n_samples`,
    `samples_per_metric` {name: samples the metric saw}, gen_ppl's scored tokens and truncated samples
    (`gen_ppl_n_tokens`, `gen_ppl_n_truncated`, likewise for gen_ppl_seq_mean) and MAUVE's `mauve_std` (over
    k-means seeds), `mauve_n` (per side) and `mauve_buckets`; metric_details holds everything else recorded
    (per-seed MAUVE values, featurizer weights hash, text convention). Writes out_dir/per_sample.csv: one row
    per sample (`fsdfm.records.load_samples`).
    """
    from fsdfm.metrics import compute_metric_set
    from fsdfm.metrics.diversity import entropy, rep_n_per_sample
    from fsdfm.records import PER_SAMPLE, write_per_sample

    ms = compute_metric_set(tokens, texts, names, **_metric_kwargs(config, evaluator, refs, corpus))
    metrics = dict(ms.values)
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
    metrics["samples_per_metric"] = {**ms.n_samples, **{k: n for k in extra.values if k in extra.per_sample}}
    metrics["n_samples"] = n
    columns = {"sample": np.arange(n), "length": content_length(tokens, corpus.eos_id)}
    columns.update(ms.per_sample)
    columns.setdefault("entropy_nats", entropy(tokens).per_sample)
    columns.setdefault("rep_n", rep_n_per_sample(tokens, 4))
    columns.update(extra.per_sample)
    write_per_sample(Path(out_dir) / PER_SAMPLE, columns)
    return {"metrics": metrics, "metric_details": ms.details, "per_sample": PER_SAMPLE}


@stage_kind("evaluate", resources="gpu", version="1", metrics=lambda c: corpus_metric_names(c))
def evaluate_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """All sample metrics of one sample stage (evaluator time is not sampling time), and the per-sample table."""
    from fsdfm.records import read_record

    corpus = corpus_for(config, out_dir)
    tokens, texts = read_samples(inputs["samples"])
    n = config["n_samples"]
    if tokens.shape[0] != n:
        raise RuntimeError(f"{inputs['samples']}: {tokens.shape[0]} samples on disk, {n} requested")
    evaluator = load_study_evaluator(config, inputs, device())
    refs = corpus.texts("valid", n) if corpus.tokenizer is not None else None
    scored = score_samples(config, tokens, texts, refs, evaluator, corpus, out_dir, _sample_metric_names(config, evaluator))
    sample_rec = read_record(Path(inputs["samples"])) or {}
    scored["metrics"].update((sample_rec.get("payload") or {}).get("metrics") or {})  # nfe, wall_s, tokens_per_s, peak_mem
    return {**scored, "n_samples": n, "samples_stage": Path(inputs["samples"]).name}


@stage_kind("evaluate_data", resources="gpu", version="1", metrics=lambda c: corpus_metric_names(c))
def evaluate_data_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The data reference row: the same metrics on real held-out blocks (a disjoint set is the MAUVE reference)."""
    corpus = corpus_for(config, out_dir)
    n = config["n_samples"]
    if corpus.valid.shape[0] < 2 * n:
        raise RuntimeError(f"the data reference row needs {2 * n} held-out blocks; the valid split has {corpus.valid.shape[0]}")
    tokens = corpus.valid[n:2 * n].numpy()
    texts = corpus.texts("valid", 2 * n)[n:] if corpus.tokenizer is not None else None  # decode only what is used
    refs = corpus.texts("valid", n) if corpus.tokenizer is not None else None
    evaluator = load_study_evaluator(config, inputs, device())
    scored = score_samples(config, tokens, texts, refs, evaluator, corpus, out_dir, _sample_metric_names(config, evaluator))
    return {**scored, "n_samples": n}


POSTERIOR_KL_STATES = 256  # held-out sequences noised at each t of the posterior_kl grid


def oracle_model_metrics(config: dict, model, path: MixturePath, corpus, h: float | None = None) -> dict:
    """posterior_kl of a trained DiT on oracle data (nats per movable position; the student at step h); {} else."""
    if config["data"]["kind"] != "oracle":
        return {}
    from fsdfm.data import DataConfig, oracle_source
    from fsdfm.metrics.oracle import posterior_kl
    from fsdfm.oracle_posterior import ExactPosterior

    exact = ExactPosterior(oracle_source(DataConfig(**config["data"])), path)
    dev = next(model.parameters()).device
    model.eval()
    gen = torch.Generator(dev).manual_seed(0)  # the same states for every model of the study
    return {"posterior_kl": posterior_kl(model, exact, path, corpus.valid[:POSTERIOR_KL_STATES].to(dev), gen, h=h)}


@stage_kind("pos_divergence", resources="gpu", version="1", metrics=("pos_divergence", "pos_divergence_slope"))
def pos_divergence_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """Per-position divergence of the few-step student from the many-step teacher, from states x_t taken
    along teacher trajectories at t_start: both finish from the same state; marginals from rollouts."""
    from fsdfm.metrics.divergence import pos_divergence

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
            return sample(m.model, m.path, n_samples=len(x_start), seq_len=corpus.seq_len, grid=grid, rule="cumulative_scalar",
                          h_conditioned=m.h_conditioned, generator=g, precision=precision, device=dev, x_init=x_start).tokens
        return go

    n_teacher = max(1, round(config["teacher_steps"] * (1 - t0)))
    n_student = max(1, round(config["student_steps"] * (1 - t0)))
    res = pos_divergence(x.cpu(), rollout(teacher, n_teacher), rollout(student, n_student), config["n_rollouts"],
                         corpus.vocab_size, generator=gen)
    return {"metrics": {"pos_divergence": float(res.tv.mean()), "pos_divergence_slope": res.slope,
                        "pos_divergence_slope_stderr": res.slope_stderr, "pos_agreement": float(res.agreement.mean()),
                        "student_nfe_from_t_start": n_student},
            "curves": {"tv": res.tv.tolist(), "js": res.js.tolist(), "agreement": res.agreement.tolist()},
            "teacher_steps_from_t_start": n_teacher, "student_steps_from_t_start": n_student}
