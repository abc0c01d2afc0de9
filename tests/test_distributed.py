"""Distributed training: ranks from the launcher's environment (known answers), and a real 2-process gloo run on CPU
whose weights equal a 1-process run on the same global batch, with checkpoints that resume across world sizes.

The loss here draws no noise (a fixed corruption of every other position at a fixed t). The DFM objectives draw
their noise per rank (`fit` seeds each rank's generator by (seed, step, rank)), so a 2-process DFM run is a valid
run but not the same computation as a 1-process one, and is not compared weight for weight.
"""

import os
import socket
import stat
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fsdfm.distributed import DistEnv, cleanup, expand_nodelist, first_host, init_distributed
from fsdfm.model import DiT, ModelConfig
from fsdfm.train import OptimConfig, fit

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SUBMITIT_EXECUTOR",
    "SUBMITIT_LOCAL_JOB_ID",
    "SUBMITIT_LOCAL_NTASKS",
    "SUBMITIT_LOCAL_GLOBALID",
    "SUBMITIT_LOCAL_LOCALID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_NODEID",
    "SLURM_JOB_NUM_NODES",
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------------ environment


def test_single_process_by_default(clean_env):
    env = DistEnv.from_env()
    assert env == DistEnv(
        rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500, source="single"
    )
    assert not env.is_distributed and env.is_main
    assert init_distributed(env=env) is env and not torch.distributed.is_initialized()  # a world of one: no-op
    cleanup()  # nothing to leave: no error


def test_torchrun_variables(clean_env):
    for key, value in dict(
        RANK="3",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        MASTER_ADDR="10.0.0.5",
        MASTER_PORT="29611",
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
    ).items():
        clean_env.setenv(key, value)
    env = DistEnv.from_env()  # torchrun's variables win over the SLURM ones of an enclosing allocation
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3,
        8,
        1,
        "10.0.0.5",
        29611,
        "torchrun",
    )
    assert env.init_method == "tcp://10.0.0.5:29611" and env.is_distributed and not env.is_main


def test_slurm_variables_and_port_from_job_id(clean_env):
    for key, value in dict(
        SLURM_PROCID="5",
        SLURM_NTASKS="8",
        SLURM_LOCALID="1",
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="gpu[07-08,10],cpu1",
    ).items():
        clean_env.setenv(key, value)
    env = DistEnv.from_env(use_scontrol=False)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 8, 1, "gpu07", "slurm")
    assert env.master_port == 15000 + 123456 % 20000 == 18456
    clean_env.setenv("MASTER_ADDR", "head-node")
    clean_env.setenv("MASTER_PORT", "40000")
    env = DistEnv.from_env(use_scontrol=False)
    assert (env.master_addr, env.master_port) == ("head-node", 40000)


def test_slurm_nodelist_fallback_and_older_names(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NPROCS", "2")  # older SLURM: no SLURM_NTASKS
    clean_env.setenv("SLURM_NODELIST", "node3,node4")
    env = DistEnv.from_env(use_scontrol=False)
    assert (env.world_size, env.master_addr, env.master_port, env.local_rank) == (2, "node3", 29500, 0)


def test_submitit_local_job_environment(clean_env):
    for key, value in dict(
        SUBMITIT_EXECUTOR="local",
        SUBMITIT_LOCAL_JOB_ID="77",
        SUBMITIT_LOCAL_NTASKS="4",
        SUBMITIT_LOCAL_GLOBALID="2",
        SUBMITIT_LOCAL_LOCALID="2",
    ).items():
        clean_env.setenv(key, value)
    env = DistEnv.from_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (2, 4, 2, "127.0.0.1", "submitit")


def test_submitit_slurm_job_environment(clean_env):
    for key, value in dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="42",
        SLURM_PROCID="1",
        SLURM_NTASKS="2",
        SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="a[1-2]",
    ).items():
        clean_env.setenv(key, value)
    env = DistEnv.from_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        1,
        2,
        0,
        "a1",
        15042,
        "submitit",
    )


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node1", ["node1"]),
        ("a1,b2", ["a1", "b2"]),
        ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
        ("n[8-10]-ib,login", ["n8-ib", "n9-ib", "n10-ib", "login"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist, use_scontrol=False) == hosts[0]


@pytest.mark.parametrize("bad", ["", "gpu[01-x]", "a[1-2]b[3-4]", "a,,b"])
def test_bad_nodelist_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_first_host_asks_scontrol_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"  # a stand-in that answers like `scontrol show hostnames` does
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 2\necho from-scontrol-1\necho x2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert first_host("weird[1-2]x[3]") == "from-scontrol-1"
    fake.write_text("#!/bin/sh\nexit 1\n")  # present but failing (no slurm.conf): parse ourselves
    assert first_host("gpu[3-4]") == "gpu3"


def test_bad_values_name_the_variable(clean_env):
    clean_env.setenv("RANK", "two")
    clean_env.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK='two'"):
        DistEnv.from_env()
    clean_env.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        DistEnv.from_env()


# ------------------------------------------------------------------------------------------------ 2-process run

V, L, N_DATA = 16, 8, 64
CFG = OptimConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9, seed=3, ckpt_every=100)


def _data() -> torch.Tensor:
    return torch.randint(V, (N_DATA, L), generator=torch.Generator().manual_seed(11))


def _model() -> DiT:
    torch.manual_seed(5)
    model = DiT(
        ModelConfig(vocab_size=V, seq_len=L, input_vocab_size=V + 1, hidden=32, cond_dim=16, n_blocks=1, n_heads=2)
    )
    for p in model.parameters():  # leave no zero-initialised layer: every parameter then gets a gradient
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    return model


SEEN: list[torch.Tensor] = []  # the batches this process trained on, in order


def _loss(ctx) -> torch.Tensor:
    """Cross-entropy at every other position, masked, at t = 0.5: a deterministic function of the batch."""
    x_1 = ctx.batch
    SEEN.append(x_1.clone())
    x_t = x_1.clone()
    x_t[:, ::2] = V
    logits = ctx.model(x_t, torch.full((x_1.shape[0],), 0.5))
    return F.cross_entropy(logits[:, ::2].reshape(-1, V), x_1[:, ::2].reshape(-1))


def _fit(ckpt_dir=None, stop_after=None):
    SEEN.clear()
    res = fit(_model(), _loss, _data(), CFG, ckpt_dir=ckpt_dir, device="cpu", progress=False, stop_after=stop_after)
    return {"model": res.model.state_dict(), "ema": res.ema.state_dict(), "steps": res.steps, "batches": list(SEEN)}


def _worker(rank: int, world: int, port: int, jobs: list, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    env = init_distributed()
    assert env.source == "torchrun" and torch.distributed.get_world_size() == world
    try:
        for name, ckpt_dir, stop_after in jobs:
            out = _fit(ckpt_dir, stop_after)
            torch.save(out, Path(out_dir) / f"{name}.rank{rank}.pt")
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["steps"] == b["steps"] == CFG.steps, what
    for part in ("model", "ema"):
        for key in a[part]:
            torch.testing.assert_close(
                a[part][key], b[part][key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {part}.{key}: {m}"
            )


def test_two_process_fit_matches_one_process_and_checkpoints_cross_world_sizes(tmp_path, clean_env):
    reference = _fit()  # 1 process, the whole global batch, uninterrupted
    _fit(tmp_path / "one_then_two", stop_after=3)  # 1 process writes a checkpoint at step 3 ...
    jobs = [
        ("two", None, None),  # 2 processes, uninterrupted
        ("two_first_half", str(tmp_path / "two_then_one"), 3),  # 2 processes stop at step 3 (rank 0 writes)
        ("one_then_two", str(tmp_path / "one_then_two"), None),
    ]  # ... which 2 processes resume
    mp.spawn(_worker, args=(2, _free_port(), jobs, str(tmp_path)), nprocs=2, join=True)
    two, two_rank1 = (torch.load(tmp_path / f"two.rank{r}.pt") for r in (0, 1))
    # each rank trained on its own half of the global batch: idx[rank::2] of the 1-process batch of that step
    assert len(two["batches"]) == len(two_rank1["batches"]) == len(reference["batches"]) == CFG.steps
    for step, (b0, b1, full) in enumerate(zip(two["batches"], two_rank1["batches"], reference["batches"])):
        assert torch.equal(b0, full[0::2]) and torch.equal(b1, full[1::2]), f"step {step}: not the rank's slice"
    assert not torch.equal(two["model"]["head.weight"], _model().state_dict()["head.weight"])  # it did train
    _assert_same(two, reference, "2 processes vs 1")
    _assert_same(two_rank1, two, "rank 1 vs rank 0")  # DDP keeps the replicas equal (EMA included)
    _assert_same(torch.load(tmp_path / "one_then_two.rank0.pt"), reference, "1 process to step 3, then 2")
    assert torch.load(tmp_path / "two_first_half.rank0.pt")["steps"] == 3
    _assert_same(_fit(tmp_path / "two_then_one"), reference, "2 processes to step 3, then 1")
