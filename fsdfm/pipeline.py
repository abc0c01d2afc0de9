"""The stage functions of a study: train, distil, sample, evaluate — plain functions `fn(config, inputs, out_dir)`.

Each is registered as a stage kind (fsdfm.stages) and returns its record's payload. Training stages save
checkpoints in out_dir/ckpt and resume from them (they are checkpointable on SLURM). Model artefacts:
    DiT methods   out_dir/model.pt  {"model_config", "state_dict" (EMA weights when EMA is on), "path", "h_conditioned"}
    AR methods    out_dir/hf/       save_pretrained (model and tokenizer): the Hugging Face loading path
    FLM / FMLM    out_dir/model.pt  (see fsdfm.flm)
Samplers are looked up by name in SAMPLERS; nothing here branches on method names. Resource classes (mapped to
partitions/GPUs by a cluster profile): training stages "gpu_multi" (DDP when the profile gives several tasks),
sampling and evaluation "gpu".
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.data import DataConfig, load_corpus
from fsdfm.model import DiT, ModelConfig, model_config, student_from_teacher
from fsdfm.objectives import DFMConfig, DFMObjective, FSDFMObjective
from fsdfm.paths import MixturePath, make_path
from fsdfm.registry import Registry
from fsdfm.results import atomic_write_bytes
from fsdfm.samplers import SampleOutput, get_rule, sample, time_grid, update
from fsdfm.schedulers import make_scheduler
from fsdfm.stages import stage_kind
from fsdfm.train import OptimConfig, fit, save_checkpoint

SAMPLERS: Registry = Registry("sampler")
LOSS_CURVE_POINTS = 200


# ---------------------------------------------------------------------------------------------- helpers

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir(out_dir: Path) -> Path:
    """Tokenizers and packed blocks are cached once per results root (or FSDFM_CACHE)."""
    return Path(os.environ.get("FSDFM_CACHE") or Path(out_dir).resolve().parents[2] / ".cache")


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


def save_dit(out_dir: Path, model: DiT, path_cfg: dict, h_conditioned: bool) -> None:
    if not is_main_rank():
        return
    save_checkpoint(Path(out_dir) / "model.pt", {"model_config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                                                 "path": path_cfg, "h_conditioned": h_conditioned})


@dataclasses.dataclass(frozen=True)
class LoadedDiT:
    model: DiT
    path: MixturePath
    path_cfg: dict
    h_conditioned: bool


def load_dit(model_dir: Path, dev: torch.device | None = None) -> LoadedDiT:
    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    model = DiT(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["state_dict"])
    model.to(dev or device()).eval()
    pc = state["path"]
    if "source" not in pc:  # continuous-state models (FLM / FMLM) have no mixture path
        return LoadedDiT(model, None, pc, state["h_conditioned"])
    return LoadedDiT(model, path_from_config(pc, model.cfg.vocab_size), pc, state["h_conditioned"])


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

@stage_kind("train_dfm", checkpointable=True, resources="gpu_multi")
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
    res = fit(model, DFMObjective(path, obj), corpus.train, OptimConfig(**config["optim"]), Path(out_dir) / "ckpt",
              desc="train dfm teacher", device=device())
    final = res.ema if res.ema is not None else res.model
    val = dfm_validation(final, path, corpus.valid, obj.eps)
    save_dit(out_dir, final, {"source": config["source"], "scheduler": config["scheduler"]}, h_conditioned=False)
    return train_metrics(res, {**val, "unigram_ce": unigram_ce(corpus.train, corpus.valid, corpus.vocab_size),
                               "n_params": model.num_parameters()})


@stage_kind("distil_fsdfm", checkpointable=True, resources="gpu_multi")
def distil_fsdfm(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The FS-DFM student, initialised from the teacher with a fresh step-size embedding."""
    from fsdfm.methods import StudentSpec

    join_process_group()
    corpus = corpus_for(config, out_dir)
    teacher = load_dit(inputs["teacher"])
    spec = StudentSpec(**config["distill"])
    torch.manual_seed(config["optim"]["seed"])
    student = student_from_teacher(teacher.model, spec.h_embedding)
    frozen = teacher.model.requires_grad_(False) if spec.shortcut == "frozen_dfm" else None
    res = fit(student, FSDFMObjective(teacher.path, spec.objective(), frozen), corpus.train,
              OptimConfig(**config["optim"]), Path(out_dir) / "ckpt", desc="distil fs-dfm student", device=device())
    final = res.ema if res.ema is not None else res.model
    save_dit(out_dir, final, teacher.path_cfg, h_conditioned=True)
    return train_metrics(res, {"n_params": student.num_parameters()})


@stage_kind("train_ar", checkpointable=True, resources="gpu_multi")
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
    return train_metrics(res.fit, {"val_nll": res.val_nll, "elbo_ppl": float(np.exp(res.val_nll)),
                                   "n_params": res.n_params})


@stage_kind("train_flm", checkpointable=True, resources="gpu_multi")
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
    save_dit(out_dir, final, {"continuous": "flm"}, h_conditioned=False)
    return train_metrics(res, {"n_params": model.num_parameters()})


@stage_kind("distil_fmlm", checkpointable=True, resources="gpu_multi")
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
    save_dit(out_dir, final, {"continuous": "fmlm"}, h_conditioned=True)
    return train_metrics(res, {"n_params": student.num_parameters()})


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


@stage_kind("sample", resources="gpu")
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
    atomic_write_bytes(out_dir / "samples.npy", buf.getvalue())
    if corpus.tokenizer is not None:
        texts = corpus.tokenizer.decode_batch(tokens.tolist())
        atomic_write_bytes(out_dir / "samples.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


def read_samples(stage_dir: Path) -> tuple[np.ndarray, list[str] | None]:
    tokens = np.load(Path(stage_dir) / "samples.npy")
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


def _metric_kwargs(config: dict, evaluator, references) -> dict:
    m = config["metrics"]
    return dict(evaluator=evaluator, references=references, mauve_featurizer=m["mauve_featurizer"],
                mauve_num_buckets=m["mauve_buckets"], self_bleu_subsample=m["self_bleu_subsample"], seed=config["seed"])


def _sample_metric_names(config: dict, evaluator) -> list[str]:
    from fsdfm.metrics import SAMPLE_METRICS
    names = [n for n in config["metrics"]["names"] if n in SAMPLE_METRICS]
    if evaluator is None:
        names = [n for n in names if n not in ("gen_ppl", "gen_ppl_seq_mean")]
    return names


@stage_kind("evaluate", resources="gpu")
def evaluate_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """All sample metrics of one sample stage (evaluator time is not sampling time)."""
    from fsdfm.metrics import compute_metrics
    from fsdfm.results import read_record

    corpus = corpus_for(config, out_dir)
    tokens, texts = read_samples(inputs["samples"])
    n = config["n_samples"]
    if tokens.shape[0] != n:
        raise RuntimeError(f"{inputs['samples']}: {tokens.shape[0]} samples on disk, {n} requested")
    evaluator = load_study_evaluator(config, inputs, device())
    refs = corpus.texts("valid", n) if corpus.tokenizer is not None else None
    metrics = compute_metrics(tokens, texts, _sample_metric_names(config, evaluator), **_metric_kwargs(config, evaluator, refs))
    metrics.update(extra_metrics(config, tokens, corpus))
    sample_rec = read_record(Path(inputs["samples"])) or {}
    metrics.update((sample_rec.get("payload") or {}).get("metrics") or {})  # nfe, wall_s, tokens_per_s, peak_mem
    metrics["n_samples"] = n
    return {"metrics": metrics, "n_samples": n, "samples_stage": Path(inputs["samples"]).name}


@stage_kind("evaluate_data", resources="gpu")
def evaluate_data_stage(config: dict, inputs: dict, out_dir: Path) -> dict:
    """The data reference row: the same metrics on real held-out blocks (a disjoint set is the MAUVE reference)."""
    from fsdfm.metrics import data_reference

    corpus = corpus_for(config, out_dir)
    n = config["n_samples"]
    if corpus.valid.shape[0] < 2 * n:
        raise RuntimeError(f"the data reference row needs {2 * n} held-out blocks; the valid split has {corpus.valid.shape[0]}")
    tokens = corpus.valid[n:2 * n].numpy()
    texts = corpus.texts("valid", 2 * n)[n:] if corpus.tokenizer is not None else None  # decode only what is used
    refs = corpus.texts("valid", n) if corpus.tokenizer is not None else None
    evaluator = load_study_evaluator(config, inputs, device())
    metrics = data_reference(tokens, texts, _sample_metric_names(config, evaluator), **_metric_kwargs(config, evaluator, refs))
    metrics.update(extra_metrics(config, tokens, corpus))
    metrics["n_samples"] = n
    return {"metrics": metrics, "n_samples": n}


EXTRA_METRICS: Registry = Registry("corpus metric")


def extra_metrics(config: dict, tokens: np.ndarray, corpus) -> dict:
    """Metrics a dataset kind adds (e.g. oracle_nll for synthetic sources): registered per dataset kind."""
    kind = config["data"]["kind"]
    return EXTRA_METRICS.get(kind)(config, tokens, corpus) if kind in EXTRA_METRICS else {}


@EXTRA_METRICS.register("oracle")
def oracle_metrics(config: dict, tokens: np.ndarray, corpus) -> dict:
    """oracle_nll of the samples next to the source's own expected NLL per token and entropy rate."""
    from fsdfm.data import DataConfig, oracle_source

    source = oracle_source(DataConfig(**config["data"]))
    expected = source.expected_nll_per_token(tokens.shape[1])
    return {"oracle_nll": float(source.nll_per_token(tokens)), "oracle_expected_nll": float(expected),
            "oracle_entropy_rate": float(source.entropy_rate)}


@stage_kind("pos_divergence", resources="gpu")
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
