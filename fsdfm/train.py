"""The training loop as a plain function: `fit(model, loss_fn, data, cfg, ckpt_dir)`.

AdamW with linear warm-up and cosine decay, gradient clipping, an optional EMA copy, bf16 autocast on
CUDA, a tqdm progress bar, and checkpoints that resume to exactly the weights of an uninterrupted run:
every step draws its batch and noise from a generator seeded by (seed, step), so no RNG stream has to
be restored, and the optimiser, schedule, EMA and loss history are saved atomically.

Under torch.distributed (DDP) every rank draws the same global batch indices and trains on its slice
`idx[rank::world]`; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fsdfm.progress import enabled as progress_enabled, step as report_step
from fsdfm.convergence import Until, stopping_rule_fires
from fsdfm.io import atomic_write
from fsdfm.tracking import train_logger


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings shared by every trained model in the suite."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999
    seed: int = 0
    ckpt_every: int = 200
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    # Convergence, shown (absent: None, and left out of `to_dict`, so stage ids without them are unchanged):
    # curve_every: evaluate held-out metrics every that many steps into the record's `curve`;
    # until: {metric, patience, every?, min_delta?} a stopping rule: stop once `metric` (lower is better) has not
    #        improved by more than min_delta for `patience` evaluations in a row; `steps` is the maximum.
    curve_every: int | None = None
    until: dict | None = None
    # GPU speed options, off by default and then absent from the stage config (`to_dict`): every study written
    # before they existed keeps its stage ids. Either changes the weights at the rounding level, hence the ids.
    compile: bool = False  # torch.compile the trained model (the first steps compile)
    fused: bool = False  # AdamW(fused=True): one kernel for the whole update (CUDA; CPU supports it too)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.curve_every is not None and (
            isinstance(self.curve_every, bool) or not isinstance(self.curve_every, int) or self.curve_every < 1
        ):
            raise ValueError(f"optim.curve_every must be an integer >= 1, got {self.curve_every!r}")
        if self.until is not None:
            object.__setattr__(self, "until", dict(Until.parse(self.until, self.curve_every).__dict__))
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1) or null, got {self.ema_decay!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"optim.precision must be auto, fp32 or bf16, got {self.precision!r}")

    def to_dict(self) -> dict:
        """The stage config's `optim`: every field, less the speed options left at their default (off) and the
        convergence settings left unset (so every study written before they existed keeps its stage ids)."""
        d = asdict(self)
        for key in _OFF_BY_DEFAULT:
            if not d[key]:
                del d[key]
        for key in ("curve_every", "until"):
            if d[key] is None:
                del d[key]
        return d

    @property
    def eval_every(self) -> int | None:
        """Steps between curve evaluations: until.every, else curve_every (None: no curve)."""
        return self.until["every"] if self.until else self.curve_every


_OFF_BY_DEFAULT = ("compile", "fused")


@dataclass
class StepContext:
    """What a loss function sees at one step. batch: (B, L) long on the device; generator: this step's noise."""

    model: nn.Module
    ema: nn.Module | None
    batch: torch.Tensor
    generator: torch.Generator
    step: int
    total_steps: int


@dataclass(frozen=True)
class FitResult:
    model: nn.Module
    ema: nn.Module | None
    steps: int
    losses: list[float]
    wall_s: float
    tokens_per_s: float
    resumed_from: int
    curve: list = field(default_factory=list)  # [{"step": s, metric: value, ...}] (cfg.eval_every and evaluate)
    stopped_at: int | None = None  # the step the stopping rule ended training at (None: ran to cfg.steps)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**63 - 1)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic and durable: torch.save into a temp file beside the target, fsync it, os.replace it over the target,
    fsync the directory.

    Without the fsync a crash soon after the rename can leave a renamed but empty checkpoint on disk (the data
    blocks were never written back), which a resume would then fail to load. A kill during the write leaves the
    old checkpoint and a stray `.<name>.<pid>.<hex>.tmp` (`fsdfm.io.atomic_write`), which `run_stage` removes when
    the stage next starts."""
    atomic_write(path, lambda f: torch.save(state, f))


class UnsafeCheckpointError(RuntimeError):
    """torch.load(weights_only=True) refused a file: it pickles objects other than tensors and plain containers."""


def load_weights(path: Path) -> object:
    """torch.load(path, map_location="cpu", weights_only=True).

    A pickle torch refuses is an `UnsafeCheckpointError` naming the file and the global it asked for; any other
    unpickling failure a RuntimeError naming the file. Neither repeats torch's advice to retry with
    weights_only=False (which would run the file's code), nor chains torch's message (which holds that advice).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        wanted = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), None)
        if wanted is not None:
            wanted = wanted.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
            raise UnsafeCheckpointError(
                f"{path}: refused by torch.load(weights_only=True): it pickles more than tensors ({wanted}); "
                f"such files are never loaded, since unpickling them can run code"
            ) from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].strip()
        if detail == text.strip():  # not torch's weights-only wrapper: keep pickle's own (short) message
            detail = detail.splitlines()[0] if detail else type(err).__name__
        raise RuntimeError(f"{path}: not a readable PyTorch checkpoint ({' '.join(detail.split())[:200]})") from None


def load_checkpoint(path: Path) -> dict:
    try:
        return load_weights(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a checkpoint that cannot be read is an error, not a silent restart
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


def _optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. foreach: the multi-tensor update (CUDA's default already; on CPU the
    same bits as the per-parameter loop); fused when asked."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        **({"fused": True} if cfg.fused else {"foreach": True}),
    )


def set_aside(ckpt: Path, rank: int = 0) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged-<n>` beside it (rank 0 only; the others just ignore it)."""
    n = 1
    while (aside := ckpt.with_name(f"{ckpt.name}.damaged-{n}")).exists():
        n += 1
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.replace(ckpt, aside)
    return aside


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """e <- e + (1 - decay) (p - e) for every parameter, as one foreach call (one multi-tensor kernel per launch
    group on a GPU instead of one kernel per parameter; the same elementwise lerp, so the same bits)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


# Host syncs of the training loop (the loss read back, its finiteness checked) every N steps: free on CPU, a
# pipeline stall per step on a GPU. A non-finite loss is still reported with its own step number.
_SYNC_EVERY = {"cpu": 1}
_SYNC_EVERY_DEFAULT = 16


def fit(
    model: nn.Module,
    loss_fn: Callable[[StepContext], torch.Tensor],
    data: torch.Tensor,
    cfg: OptimConfig,
    ckpt_dir: Path | str | None = None,
    desc: str = "train",
    device: torch.device | str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    sync_every: int | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
) -> FitResult:
    """Train `model` for cfg.steps steps of `loss_fn` on blocks `data` (N, L) long.

    Resumes from `ckpt_dir/checkpoint.pt` when it exists. `stop_after` ends the call early after that many
    steps (for tests of resumption and for preemption); the checkpoint is written before returning.
    sync_every: read the losses back to the host (and check them finite) every that many steps (default 1 on CPU,
    16 on a GPU; always before a checkpoint and at the end); the losses and the weights do not depend on it.
    evaluate: held-out metrics of the model being kept (the EMA copy when EMA is on) -> {name: float}, called every
    cfg.eval_every steps and at the end into `FitResult.curve`; with cfg.until, training stops once until.metric
    has not improved for until.patience evaluations (the curve and the rule's state are in the checkpoint, so a
    resumed run stops where an uninterrupted one does).
    """
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"training data must be a non-empty (N, L) tensor, got shape {tuple(data.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay is not None else None
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = _optimizer(model, cfg)
    if cfg.compile:
        trained = torch.compile(trained)
    sync_every = sync_every or _SYNC_EVERY.get(device.type, _SYNC_EVERY_DEFAULT)
    ckpt = Path(ckpt_dir) / "checkpoint.pt" if ckpt_dir is not None else None
    start, losses, curve, stopped = 0, [], [], None
    if ckpt is not None and ckpt.exists():
        init = copy.deepcopy(model.state_dict())  # to start clean if the checkpoint fails half-way through loading
        try:
            state = load_checkpoint(ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            start, losses = int(state["step"]), [float(x) for x in state["losses"]]
            curve, stopped = list(state.get("curve", [])), state.get("stopped_at")
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
            # A damaged checkpoint must not fail every later attempt: set it aside (kept for a post-mortem, never
            # read again) and train from step 0, which gives the weights of an uninterrupted run.
            aside = set_aside(ckpt, rank)
            print(
                f"{ckpt}: damaged checkpoint ({' '.join(str(e).split())[:160]}); moved aside to {aside.name}, "
                "training restarts from step 0",
                file=sys.stderr,
                flush=True,
            )
            model.load_state_dict(init)
            opt = _optimizer(model, cfg)
            ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay is not None else None
            start, losses, curve, stopped = 0, [], [], None
    every = cfg.eval_every if evaluate is not None else None

    def evaluate_at(step: int) -> None:
        kept = ema if ema is not None else model
        kept.eval()
        with torch.no_grad():
            curve.append({"step": step, **{k: float(v) for k, v in evaluate(kept).items()}})
        model.train()

    def should_stop() -> bool:
        return stopping_rule_fires(curve, cfg.until)

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def write(step: int) -> None:
        if ckpt is not None and rank == 0:
            save_checkpoint(
                ckpt,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "losses": losses,
                    "ema": ema.state_dict() if ema is not None else None,
                    "curve": curve,
                    "stopped_at": stopped,
                },
            )

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    if stopped is not None:  # a resumed run the stopping rule had already ended
        end = start
    bar = tqdm(
        range(start, end),
        desc=desc,
        initial=start,
        total=cfg.steps,
        disable=not progress or rank != 0 or not progress_enabled(),
        mininterval=2.0,
        dynamic_ncols=True,
    )
    model.train()

    track = train_logger()  # None unless a tracker is active (fsdfm run --track); it only reads what is computed
    step_tokens = cfg.batch_size * data.shape[1]
    pending: list[torch.Tensor] = []  # this window's losses, still on the device

    def flush() -> None:
        """Read the pending losses back (one sync) and fail on the first non-finite one."""
        if not pending:
            return
        values = torch.stack(pending).float().tolist()
        first = len(losses)  # the losses of steps 0 .. first - 1 are in (a resumed fit's from its checkpoint)
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"{desc}: non-finite loss {v} at step {first + i}")
        losses.extend(values)

    t0 = time.perf_counter()
    for step in bar:
        t_step = time.perf_counter()
        g_data = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        idx = torch.randint(data.shape[0], (cfg.batch_size,), generator=g_data)[rank::world]
        batch = data[idx]
        if device.type == "cuda":  # from pinned host memory the non-blocking copy is truly asynchronous
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        g_noise = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, salt=1 + rank))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(StepContext(trained, ema, batch, g_noise, step, cfg.steps))
        if sync_every == 1 and not torch.isfinite(loss):  # before the update, as always on CPU
            raise FloatingPointError(f"{desc}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay)
        pending.append(loss.detach())
        if track is not None or (step + 1 - start) % sync_every == 0:
            flush()  # the read waits for the step, so t_step below times all of it
        if track is not None:
            dt = time.perf_counter() - t_step
            track(step, losses[-1], opt.param_groups[0]["lr"], step_tokens / dt if dt > 0 else 0.0)
        if step % 10 == 0 and losses:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if progress and rank == 0:  # for `fsdfm status` and logs off a terminal (fsdfm.progress.step)
            report_step(step + 1, cfg.steps, desc, losses[-1])
        if every and (step + 1) % every == 0 and (step + 1) < cfg.steps:
            evaluate_at(step + 1)
            if should_stop():
                stopped = end = step + 1
                break
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < end:
            flush()
            write(step + 1)
    flush()
    wall = time.perf_counter() - t0
    if every and end == cfg.steps and (not curve or curve[-1]["step"] != end):
        evaluate_at(end)  # the final point
    write(end)
    n_tokens = (end - start) * cfg.batch_size * data.shape[1]
    return FitResult(
        model=model,
        ema=ema,
        steps=end,
        losses=losses,
        wall_s=wall,
        tokens_per_s=n_tokens / wall if wall > 0 else 0.0,
        resumed_from=start,
        curve=curve,
        stopped_at=stopped,
    )
