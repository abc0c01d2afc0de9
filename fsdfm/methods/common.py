"""What every method's stages share: devices, the corpus, DiT artefacts, the training-stage skeleton, samplers.

Stage functions are plain `fn(config, inputs, out_dir) -> payload` (fsdfm.study.graph). Training stages save
checkpoints in out_dir/ckpt and resume from them (they are checkpointable on SLURM). Model artefacts:
    DiT methods   out_dir/model.pt  {"model_config", "state_dict" (EMA weights when EMA is on), "path", "h_conditioned"}
    released      out_dir/released.json  a pointer to the checkpoint file (the 1.3B weights are not copied)
    AR methods    out_dir/hf/       save_pretrained (model and tokenizer): the Hugging Face loading path
    FLM / FMLM    out_dir/model.pt  (see fsdfm.flm)
Samplers are looked up by name in SAMPLERS (each kind file registers its own); nothing here branches on method
names. Resource classes (mapped to partitions/GPUs by a cluster profile): training stages "gpu_multi" (DDP when
the profile gives several tasks), sampling and evaluation "gpu".

Boundary: knows the library floor (model, paths, train loop, data); knows no method kind and no spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsdfm.data import DataConfig, load_corpus, oracle_source
from fsdfm.metrics.timing import CountingModel
from fsdfm.model import DiT, ModelConfig, model_config
from fsdfm.paths import MixturePath, make_path
from fsdfm.registry import Registry
from fsdfm.io import atomic_write
from fsdfm.schedulers import make_scheduler
from fsdfm.train import OptimConfig, UnsafeCheckpointError, fit, load_weights, save_checkpoint
from fsdfm.distributed import init_distributed
from fsdfm.metrics.oracle import posterior_kl
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.records import stage_cache_dir
from fsdfm.released_checkpoints import CheckpointError, load_released
from fsdfm.released_mdlm import load_mdlm_family


def forward_precision(cfg: dict) -> str:
    """The sample stage's forward precision: "float32" (the default, absent from the config) or "bfloat16"."""
    return cfg.get("forward_precision", "float32")


def forward_autocast(cfg: dict) -> bool:
    """Whether the sampler runs its network under bf16 autocast (sampling.forward_precision: bfloat16)."""
    return forward_precision(cfg) == "bfloat16"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for the float32 matmuls and convolutions left outside autocast (CUDA only; no effect on a CPU), restored
    on exit so that nothing else in the process (the evaluator, which must score in fp32) inherits it."""
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# name -> prepare(model_dir, cfg, corpus, dev) -> Draw: load the model, wrap it in a RowCounter, warm up (each kind
# file registers its own; the sample stage times `Draw.run` and reads the counter)
SAMPLERS: Registry = Registry("sampler")

# The code every stage that loads a corpus depends on, and every DiT training stage: parts of the `sources` of
# their stage kinds (`@stage_kind(..., sources=...)`, digested by fsdfm.versions).
DATA_SOURCES = (
    "fsdfm.data.base:load_corpus",
    "fsdfm.data.documents",
    "fsdfm.data.tokenizer",
    "fsdfm.data.text",
    "fsdfm.data.tokenfiles",
    "fsdfm.data.hf",
    "fsdfm.data.oracle",
    "fsdfm.methods.common:corpus_for",
)
DIT_SOURCES = (
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
LOSS_CURVE_POINTS = 200


# ---------------------------------------------------------------------------------------------- helpers


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir(out_dir: Path) -> Path:
    """Tokenizers and packed blocks are cached once per results root (or FSDFM_CACHE): fsdfm.records.cache."""
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
    return [float(np.mean(losses[i : i + k])) for i in range(0, len(losses), k)]


def is_main_rank() -> bool:
    """True outside DDP and on rank 0: the one process that writes a training stage's model."""
    return (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )


def join_process_group() -> None:
    """Multi-task jobs (SLURM tasks_per_node > 1, torchrun) train with DDP: ranks from the environment; a no-op
    for one process. `fit` then gives every rank its slice of the global batch."""
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
    save_checkpoint(
        Path(out_dir) / "model.pt",
        {
            "model_config": model.cfg.to_dict(),
            "state_dict": model.state_dict(),
            "path": path_cfg,
            "h_conditioned": h_conditioned,
        },
    )


@dataclasses.dataclass(frozen=True)
class LoadedDiT:
    """released: the weights are a released checkpoint's (kind released / released_duo), not trained here."""

    model: DiT
    path: MixturePath
    path_cfg: dict
    h_conditioned: bool
    released: bool = False


class ArtefactError(RuntimeError):
    """An input artefact (model.pt, samples.npy) that cannot be read: the message names the file."""


RELEASED_POINTER = "released.json"


def load_dit(model_dir: Path, dev: torch.device | None = None) -> LoadedDiT:
    if (Path(model_dir) / RELEASED_POINTER).exists():  # kind released: a pointer to a checkpoint, not weights
        return load_released_dit(Path(model_dir) / RELEASED_POINTER, dev or device())
    path = Path(model_dir) / "model.pt"
    try:
        state = load_weights(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file raises OSError/RuntimeError/EOFError that name no file
        raise ArtefactError(
            f"{path}: cannot be read as a model ({type(e).__name__}: {e}); delete the stage "
            "folder (fsdfm clean) or re-run the study, which redoes damaged stages"
        ) from e
    model = DiT(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["state_dict"])
    model.to(dev or device()).eval()
    pc = state["path"]
    if "source" not in pc:  # continuous-state models (FLM / FMLM) have no mixture path
        return LoadedDiT(model, None, pc, state["h_conditioned"])
    return LoadedDiT(model, path_from_config(pc, model.cfg.vocab_size), pc, state["h_conditioned"])


def load_released_dit(pointer_file: Path, dev: torch.device) -> LoadedDiT:
    """The model a load_released stage points to, refusing a checkpoint file that changed since (size, mtime)."""
    ptr = json.loads(Path(pointer_file).read_text())
    stat = Path(ptr["checkpoint"]).stat() if Path(ptr["checkpoint"]).is_file() else None
    if stat is None or (stat.st_size, stat.st_mtime_ns) != (ptr["size_bytes"], ptr["mtime_ns"]):
        raise CheckpointError(
            f"{ptr['checkpoint']}: the checkpoint {pointer_file} points to is gone or changed since it "
            f"was checked; re-run its load_released stage (delete {Path(pointer_file).parent})"
        )
    family = ptr.get("family", "fsdfm")  # pointers written before families existed are apple/ml-fs-dfm's
    if family == "fsdfm":
        loaded = load_released(ptr["checkpoint"], ptr["which"], device=dev)
    else:  # MDLM / SDTT / Duo: fsdfm.released_mdlm, the real-token count the stage checked against the corpus
        loaded = load_mdlm_family(
            ptr["checkpoint"], family, ptr["which"], device=dev, vocab_size=ptr["model_config"]["vocab_size"]
        )
    return LoadedDiT(
        loaded.model,
        path_from_config(ptr["path"], loaded.config.vocab_size),
        ptr["path"],
        loaded.h_conditioned,
        released=True,
    )


def train_metrics(res, extra: dict | None = None) -> dict:
    return {
        "metrics": {
            "train_loss_final": float(np.mean(res.losses[-20:])),
            "train_wall_s": res.wall_s,
            "train_tokens_per_s": res.tokens_per_s,
            **(extra or {}),
        },
        "loss_curve": loss_curve(res.losses),
        "resumed_from": res.resumed_from,
        # convergence, shown: held-out metrics along training (optim.curve_every / optim.until; else absent)
        **({"curve": res.curve} if res.curve else {}),
        **({"stopped_at": res.stopped_at} if res.stopped_at is not None else {}),
    }


def fit_dit(
    model: DiT,
    objective,
    corpus,
    config: dict,
    out_dir: Path,
    desc: str,
    path_cfg: dict,
    h_conditioned: bool,
    evaluate=None,
):
    """The training-stage skeleton every DiT method shares: fit `model` on the corpus with `objective` and
    config["optim"] (resuming from out_dir/ckpt), save the final weights (the EMA copy when EMA is on) as
    out_dir/model.pt with the corpus tokenizer. Returns (fit result, final model). evaluate: held-out metrics
    along training (`fsdfm.train.fit`), used when config["optim"] asks for a curve."""
    res = fit(
        model,
        objective,
        corpus.train,
        OptimConfig(**config["optim"]),
        Path(out_dir) / "ckpt",
        desc=desc,
        device=device(),
        evaluate=evaluate,
    )
    final = res.ema if res.ema is not None else res.model
    save_dit(out_dir, final, path_cfg, h_conditioned=h_conditioned, corpus=corpus)
    return res, final


def oracle_model_metric(config: dict) -> tuple:
    """posterior_kl, which a DiT training stage records on oracle data (`oracle_model_metrics`)."""
    return ("posterior_kl",) if (config.get("data") or {}).get("kind") == "oracle" else ()


POSTERIOR_KL_STATES = 256  # held-out sequences noised at each t of the posterior_kl grid
CURVE_STATES = 64  # the same, at each point of a training curve (cheaper; the final value uses 256)


def oracle_curve_metrics(config: dict, path: MixturePath, corpus, hs: tuple = (None,)) -> dict:
    """{name: fn(model) -> float} of posterior_kl along training on oracle data, one per step size h in `hs`
    (None: no h, the teacher; the student at each h = 2^-j it trains and is sampled at); {} on other data."""
    if config["data"]["kind"] != "oracle":
        return {}
    exact = ExactPosterior(oracle_source(DataConfig(**config["data"])), path)

    def one(h):
        def fn(model) -> float:
            dev = next(model.parameters()).device
            gen = torch.Generator(dev).manual_seed(0)
            return posterior_kl(model, exact, path, corpus.valid[:CURVE_STATES].to(dev), gen, h=h)

        return fn

    return {("posterior_kl" if h is None else f"posterior_kl_h{h:g}"): one(h) for h in hs}


def oracle_model_metrics(config: dict, model, path: MixturePath, corpus, h: float | None = None) -> dict:
    """posterior_kl of a trained DiT on oracle data (nats per movable position; the student at step h); {} else."""
    if config["data"]["kind"] != "oracle":
        return {}
    exact = ExactPosterior(oracle_source(DataConfig(**config["data"])), path)
    dev = next(model.parameters()).device
    model.eval()
    gen = torch.Generator(dev).manual_seed(0)  # the same states for every model of the study
    return {"posterior_kl": posterior_kl(model, exact, path, corpus.valid[:POSTERIOR_KL_STATES].to(dev), gen, h=h)}


class RowCounter(CountingModel):
    """fsdfm.metrics.timing.CountingModel that also counts the rows (sequences) each call evaluates, so that
    NFE per sample = rows evaluated / samples drawn, whatever the batching (a remainder batch included)."""

    def __init__(self, model):
        super().__init__(model)
        self.rows = 0

    def forward(self, x, *args, **kwargs):
        self.rows += int(x.shape[0])
        return super().forward(x, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.rows = 0


@dataclasses.dataclass(frozen=True)
class Draw:
    """A sampler ready to draw: the model loaded and warmed up. `run(generator)` draws cfg["n_samples"]
    sequences; `counter` (reset after the warm-up) counts the network's evaluations, or None where the sampler
    counts them itself (AR: transformers' cache API calls the model)."""

    run: Callable[[torch.Generator], object]
    counter: RowCounter | None = None


def draw_samples(sampler: str, model_dir: Path, cfg: dict, corpus, dev, generator):
    """Prepare SAMPLERS[sampler] and draw once: the tokens of the sample stage for the same cfg and seed."""
    return SAMPLERS.get(sampler)(model_dir, cfg, corpus, dev).run(generator)
