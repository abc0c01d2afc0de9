"""The training loop: exact resumption from checkpoints, the schedule, EMA, input checks, and a real loss that falls.

The last test trains a small DiT teacher with the DFM objective on TinyStories bytes and compares its loss with
a unigram model's cross-entropy computed independently on the same blocks.
"""

import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fsdfm.model import DiT, ModelConfig
from fsdfm.objectives import DFMConfig, DFMObjective
from fsdfm.paths import MaskSource, MixturePath
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.train import OptimConfig, StepContext, fit, load_checkpoint, lr_factor, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


V, L = 12, 8


def _tiny_dit(seed=0):
    torch.manual_seed(seed)
    return DiT(
        ModelConfig(vocab_size=V, input_vocab_size=V + 1, seq_len=L, hidden=16, cond_dim=8, n_blocks=1, n_heads=2)
    )


def _data(n=64):
    return torch.randint(V, (n, L), generator=torch.Generator().manual_seed(0))


def _objective():
    return DFMObjective(MixturePath(PolynomialScheduler(1), MaskSource(V)), DFMConfig(loss="ce"))


CFG = OptimConfig(steps=7, batch_size=4, lr=1e-2, warmup_steps=2, ema_decay=0.9, ckpt_every=2, seed=3)


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_equals_uninterrupted_run(tmp_path):
    full = fit(_tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path / "full", progress=False, device="cpu")
    assert full.steps == 7 and len(full.losses) == 7 and full.resumed_from == 0

    first = fit(
        _tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path / "split", progress=False, device="cpu", stop_after=3
    )
    assert first.steps == 3 and len(first.losses) == 3
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    # a fresh process would build a fresh model: resume into a differently initialised one
    second = fit(
        _tiny_dit(seed=1), _objective(), _data(), CFG, ckpt_dir=tmp_path / "split", progress=False, device="cpu"
    )
    assert second.resumed_from == 3 and second.steps == 7
    assert second.losses == full.losses  # the checkpoint carries the loss history
    _assert_same_state(second.model, full.model)
    _assert_same_state(second.ema, full.ema)
    # the EMA is a real average, not a copy of the weights
    assert not torch.equal(full.ema.head.weight, full.model.head.weight)
    # a finished run resumes to a no-op
    again = fit(
        _tiny_dit(seed=2), _objective(), _data(), CFG, ckpt_dir=tmp_path / "split", progress=False, device="cpu"
    )
    assert again.resumed_from == 7 and again.losses == full.losses
    _assert_same_state(again.model, full.model)


def test_resume_after_a_crash_from_the_periodic_checkpoint(tmp_path):
    full = fit(_tiny_dit(), _objective(), _data(), CFG, progress=False, device="cpu")

    class Crash(Exception):
        pass

    objective = _objective()

    def crashing(ctx: StepContext):
        if ctx.step == 5:
            raise Crash
        return objective(ctx)

    with pytest.raises(Crash):
        fit(_tiny_dit(), crashing, _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu")
    resumed = fit(_tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu")
    assert resumed.resumed_from == 4  # ckpt_every = 2: the last checkpoint before step 5 holds 4 steps
    assert resumed.losses == full.losses
    _assert_same_state(resumed.model, full.model)
    _assert_same_state(resumed.ema, full.ema)


def test_lr_schedule_known_values():
    cfg = OptimConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(4, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))


def test_first_step_uses_warmup_lr_and_ema_is_a_lerp():
    # AdamW's first step moves each weight by lr * g / (|g| + eps) = lr * sign(g) (no weight decay)
    cfg = OptimConfig(steps=1, batch_size=2, lr=0.1, warmup_steps=4, ema_decay=0.75, grad_clip=0.0)
    model = Scalar()
    res = fit(
        model,
        lambda ctx: (ctx.model.w * torch.tensor([3.0, -5.0])).sum(),
        torch.zeros(4, 1, dtype=torch.long),
        cfg,
        progress=False,
        device="cpu",
    )
    lr0 = 0.1 * (1 / 4)
    expected = torch.tensor([1.0 - lr0, -2.0 + lr0])
    assert torch.allclose(res.model.w.detach(), expected, atol=1e-6)
    # ema = decay * start + (1 - decay) * new
    assert torch.allclose(res.ema.w, 0.75 * torch.tensor([1.0, -2.0]) + 0.25 * expected, atol=1e-6)
    assert res.losses == [pytest.approx(3.0 * 1.0 + (-5.0) * (-2.0))]


def test_batches_are_drawn_from_the_data_by_step_seed():
    data = torch.arange(40).view(20, 2)
    seen = []

    def spy(ctx: StepContext):
        seen.append((ctx.step, ctx.batch.clone(), ctx.generator.initial_seed()))
        return (ctx.model.w**2).sum()

    cfg = OptimConfig(steps=3, batch_size=5, ema_decay=None, seed=7)
    fit(Scalar(), spy, data, cfg, progress=False, device="cpu")
    first = list(seen)
    seen.clear()
    fit(Scalar(), spy, data, cfg, progress=False, device="cpu")
    assert [s for s, _, _ in first] == [0, 1, 2]
    for (s1, b1, g1), (s2, b2, g2) in zip(first, seen):
        assert torch.equal(b1, b2) and g1 == g2
        assert b1.shape == (5, 2)
        assert bool((b1[:, 1] == b1[:, 0] + 1).all()) and bool((b1[:, 0] % 2 == 0).all())  # whole rows of data
    assert len({g for _, _, g in first}) == 3  # a fresh noise stream per step


def test_input_checks():
    with pytest.raises(ValueError, match=r"non-empty \(N, L\)"):
        fit(
            Scalar(),
            lambda ctx: ctx.model.w.sum(),
            torch.zeros(0, 4, dtype=torch.long),
            OptimConfig(),
            progress=False,
            device="cpu",
        )
    with pytest.raises(ValueError, match=r"non-empty \(N, L\)"):
        fit(
            Scalar(),
            lambda ctx: ctx.model.w.sum(),
            torch.zeros(4, dtype=torch.long),
            OptimConfig(),
            progress=False,
            device="cpu",
        )
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        fit(
            Scalar(),
            lambda ctx: ctx.model.w.sum() * float("nan"),
            torch.zeros(4, 1, dtype=torch.long),
            OptimConfig(steps=2, batch_size=1),
            progress=False,
            device="cpu",
        )
    with pytest.raises(ValueError, match="optim.steps"):
        OptimConfig(steps=0)
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="optim.ema_decay"):
        OptimConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="optim.precision"):
        OptimConfig(precision="fp16")


@pytest.mark.parametrize("damage", [b"not a checkpoint", b""], ids=["garbage", "empty"])
def test_a_damaged_checkpoint_is_set_aside_and_training_restarts(tmp_path, capsys, damage):
    """Issue 23: an unreadable checkpoint used to fail every later attempt. It is moved aside (kept, named on
    stderr) and training restarts from step 0, to exactly the weights of an uninterrupted run."""
    full = fit(_tiny_dit(), _objective(), _data(), CFG, progress=False, device="cpu")
    fit(_tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu", stop_after=3)
    (tmp_path / "checkpoint.pt").write_bytes(damage)
    res = fit(_tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu")
    assert res.resumed_from == 0 and res.losses == full.losses
    _assert_same_state(res.model, full.model)
    _assert_same_state(res.ema, full.ema)
    assert (tmp_path / "checkpoint.pt.damaged-1").read_bytes() == damage  # kept for a post-mortem, never read
    err = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoint.pt'}: damaged checkpoint" in err and "restarts from step 0" in err


def test_a_checkpoint_of_another_model_is_set_aside_too(tmp_path):
    """Readable, but its state does not fit the model (a half-loaded model must not leak into the restart)."""
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": torch.ones(3)}, "optimizer": {}, "step": 2})
    full = fit(_tiny_dit(), _objective(), _data(), CFG, progress=False, device="cpu")
    res = fit(_tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu")
    assert res.resumed_from == 0 and res.losses == full.losses
    _assert_same_state(res.model, full.model)
    assert (tmp_path / "checkpoint.pt.damaged-1").is_file()


# ------------------------------------------------------------------------------------------ a real loss that falls


def _tinystories_byte_blocks(n_bytes: int, seq_len: int) -> torch.Tensor:
    """Raw bytes of the bundled TinyStories, each byte replaced by its rank among the bytes present, in blocks."""
    raw = torch.tensor(list((ROOT / "data" / "tinystories" / "train.txt").read_bytes()[:n_bytes]))
    _, ids = torch.unique(raw, return_inverse=True)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def test_teacher_loss_falls_below_unigram_on_tinystories():
    seq_len = 16
    data = _tinystories_byte_blocks(100_000, seq_len)
    V_data = int(data.max()) + 1
    # unigram baseline on the same blocks: predicting every masked byte by the byte frequencies costs H(unigram)
    freq = torch.bincount(data.flatten(), minlength=V_data).double()
    freq = freq[freq > 0] / freq.sum()
    unigram_ce = float(-(freq * freq.log()).sum())
    assert 2.5 < unigram_ce < math.log(V_data)

    torch.manual_seed(0)
    model = DiT(
        ModelConfig(
            vocab_size=V_data,
            input_vocab_size=V_data + 1,
            seq_len=seq_len,
            hidden=64,
            cond_dim=32,
            n_blocks=1,
            n_heads=2,
        )
    )
    objective = DFMObjective(MixturePath(PolynomialScheduler(1), MaskSource(V_data)), DFMConfig(loss="ce"))
    cfg = OptimConfig(steps=200, batch_size=64, lr=3e-3, warmup_steps=20, ema_decay=None, ckpt_every=0, seed=0)
    res = fit(model, objective, data, cfg, progress=False, device="cpu")

    assert res.losses[0] == pytest.approx(math.log(V_data), rel=1e-5)  # zero-initialised head: uniform logits
    final = sum(res.losses[-20:]) / 20
    # a fixed evaluation of the same objective on 1,024 blocks (fresh t and masks)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(123)
        idx = torch.randint(data.shape[0], (1024,), generator=gen)
        evaluated = float(objective(StepContext(model, None, data[idx], gen, 0, 1)))
    for loss in (final, evaluated):
        assert loss < math.log(V_data) - 1.0
        assert loss < unigram_ce - 0.1, (loss, unigram_ce)


def test_save_checkpoint_fsyncs_the_temp_file_before_renaming_it(tmp_path, monkeypatch):
    """The checkpoint's bytes are on disk before the rename makes them the checkpoint (then the directory)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.arange(3), "step": 2})
    tmp = events[0][1]  # fsdfm.io.atomic_write's temp name: .<name>.<pid>.<8 hex>.tmp
    assert re.fullmatch(rf"\.checkpoint\.pt\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", tmp)
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", "ckpt")]
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3)) and sorted(path.parent.iterdir()) == [path]


def test_failed_checkpoint_write_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1 and sorted(tmp_path.iterdir()) == [path]


class NotATensor:
    """Pickled by reference (GLOBAL tests.test_train.NotATensor): weights_only=True must refuse it."""


@pytest.mark.parametrize(
    "payload",
    [NotATensor(), {"state_dict": {}, "when": __import__("datetime").date(2020, 1, 1)}],
    ids=["class", "datetime"],
)
def test_a_refused_pickle_names_the_file_and_global_without_the_weights_only_false_advice(payload, tmp_path):
    from fsdfm.methods.common import load_dit
    from fsdfm.train import UnsafeCheckpointError, load_checkpoint

    path = tmp_path / "model.pt"
    torch.save(payload, path)
    for load in (lambda: load_checkpoint(path), lambda: load_dit(tmp_path)):
        with pytest.raises(UnsafeCheckpointError) as err:
            load()
        msg = str(err.value)
        assert str(path) in msg and "Unsupported global" in msg
        assert ("NotATensor" if isinstance(payload, NotATensor) else "datetime.date") in msg
        assert "weights_only=False" not in msg and "weights_only` set to `False`" not in msg
        assert "add_safe_globals" not in msg
        assert err.value.__cause__ is None and err.value.__suppress_context__  # torch's text is not chained


def test_garbage_checkpoint_message_has_no_torch_advice(tmp_path):
    from fsdfm.train import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path)
    assert "cannot load checkpoint" in str(err.value) and str(path) in str(err.value)
    assert "False" not in str(err.value)


def test_deferred_host_syncs_change_nothing(tmp_path):
    """sync_every (the GPU default reads the losses back every 16 steps) gives the same losses, weights and EMA as
    reading them every step; the periodic checkpoint and resumption still hold the whole loss history."""
    every = fit(_tiny_dit(), _objective(), _data(), CFG, progress=False, device="cpu")
    deferred = fit(
        _tiny_dit(),
        _objective(),
        _data(),
        CFG,
        ckpt_dir=tmp_path,
        progress=False,
        device="cpu",
        sync_every=3,
        stop_after=5,
    )
    assert deferred.losses == every.losses[:5]
    resumed = fit(
        _tiny_dit(), _objective(), _data(), CFG, ckpt_dir=tmp_path, progress=False, device="cpu", sync_every=4
    )
    assert resumed.resumed_from == 5 and resumed.losses == every.losses
    _assert_same_state(resumed.model, every.model)
    _assert_same_state(resumed.ema, every.ema)


def test_a_deferred_non_finite_loss_names_its_own_step():
    """With syncs every 4 steps a NaN at step 2 is caught at the window's end and reported as step 2."""

    def loss_fn(ctx):
        return ctx.model.w.sum() * (float("nan") if ctx.step == 2 else 1.0)

    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2"):
        fit(
            Scalar(),
            loss_fn,
            torch.zeros(4, 1, dtype=torch.long),
            OptimConfig(steps=6, batch_size=1),
            progress=False,
            device="cpu",
            sync_every=4,
        )


def test_foreach_ema_is_the_per_parameter_lerp():
    """ema_update (one foreach call) equals e.lerp_(p, 1 - decay) parameter by parameter, bit for bit."""
    from fsdfm.train import ema_update

    model, ema = _tiny_dit(0), _tiny_dit(1)
    expected = [e.detach().clone().lerp_(p.detach(), 1 - 0.97) for e, p in zip(ema.parameters(), model.parameters())]
    ema_update(ema, model, 0.97)
    assert all(torch.equal(e, x) for e, x in zip(ema.parameters(), expected))


def test_speed_options_are_absent_from_the_stage_config_unless_on():
    """compile and fused AdamW: off by default and then not in `to_dict` (stage ids of existing studies unchanged);
    on, they are recorded. Fused AdamW trains (CPU supports it) to the same weights within rounding."""
    assert "compile" not in CFG.to_dict() and "fused" not in CFG.to_dict()
    on = OptimConfig(**{**CFG.to_dict(), "fused": True, "compile": True})
    assert on.to_dict()["fused"] is True and on.to_dict()["compile"] is True
    fused = OptimConfig(**{**CFG.to_dict(), "fused": True})
    a = fit(_tiny_dit(), _objective(), _data(), CFG, progress=False, device="cpu")
    b = fit(_tiny_dit(), _objective(), _data(), fused, progress=False, device="cpu")
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), k
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
