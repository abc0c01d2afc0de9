"""Ranks and rendezvous for multi-process (DDP) training, read from the launcher's environment.

Where each process learns who it is, in this order (the first that applies wins):

1. torchrun (or a launcher that already exported the torch.distributed variables): RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT.
2. submitit (SUBMITIT_EXECUTOR set and submitit importable): `submitit.JobEnvironment()` -- global_rank, num_tasks,
   local_rank and the job's first host (127.0.0.1 for submitit's local executor).
3. SLURM (SLURM_PROCID set, e.g. under `srun`): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first
   host of SLURM_JOB_NODELIST (or SLURM_NODELIST), expanded by `scontrol show hostnames` when scontrol is on PATH,
   else by `expand_nodelist` (prefix[01-04,7] groups).
4. Otherwise a single process: rank 0 of 1.

MASTER_ADDR / MASTER_PORT override the derived address and port whenever they are set. Without MASTER_PORT, a SLURM
job derives the port from its job id (every task of the job agrees on it, and two jobs sharing a node rarely
collide); otherwise DEFAULT_PORT.

`init_distributed()` starts the process group (nccl on CUDA, gloo on CPU) and is a no-op for a world of one;
`fsdfm.train.fit` then wraps the model in DistributedDataParallel and gives every rank its slice of the global batch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000  # ports derived from a SLURM job id: 15000..34999

__all__ = ["DistEnv", "cleanup", "expand_nodelist", "first_host", "init_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a multi-process job. source: where it was read ("torchrun", "submitit", "slurm" or
    "single")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = DEFAULT_ADDR
    master_port: int = DEFAULT_PORT
    source: str = "single"

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"DistEnv: world_size must be >= 1, got {self.world_size} (source: {self.source})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv: rank {self.rank} is outside 0..{self.world_size - 1} (source: {self.source})")
        if self.local_rank < 0:
            raise ValueError(f"DistEnv: local_rank must be >= 0, got {self.local_rank} (source: {self.source})")
        if not 0 < self.master_port < 65536:
            raise ValueError(
                f"DistEnv: master_port must be in 1..65535, got {self.master_port} (source: {self.source})"
            )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr  # IPv6 literal
        return f"tcp://{host}:{self.master_port}"

    @classmethod
    def from_env(cls, use_scontrol: bool = True) -> "DistEnv":
        """Read os.environ (see the module docstring for the order). use_scontrol=False parses SLURM node lists
        without calling `scontrol show hostnames`."""
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=_int(env, "RANK"),
                world_size=_int(env, "WORLD_SIZE"),
                local_rank=_int(env, "LOCAL_RANK", 0),
                master_addr=env.get("MASTER_ADDR", DEFAULT_ADDR),
                master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
                source="torchrun",
            )
        submitit_env = _submitit_environment() if env.get("SUBMITIT_EXECUTOR") else None
        if submitit_env is not None:
            host = DEFAULT_ADDR if submitit_env.cluster == "local" else submitit_env.hostnames[0]
            return cls(
                rank=int(submitit_env.global_rank),
                world_size=int(submitit_env.num_tasks),
                local_rank=int(submitit_env.local_rank),
                master_addr=env.get("MASTER_ADDR", host),
                master_port=_int(env, "MASTER_PORT", _slurm_port(env)),
                source="submitit",
            )
        if "SLURM_PROCID" in env:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
            addr = env.get("MASTER_ADDR") or (first_host(nodelist, use_scontrol) if nodelist else DEFAULT_ADDR)
            ntasks = "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS"  # the older name
            return cls(
                rank=_int(env, "SLURM_PROCID"),
                world_size=_int(env, ntasks, 1),
                local_rank=_int(env, "SLURM_LOCALID", 0),
                master_addr=addr,
                master_port=_int(env, "MASTER_PORT", _slurm_port(env)),
                source="slurm",
            )
        return cls()


def _int(env, key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _slurm_port(env) -> int:
    """A port every task of a SLURM job derives alike from the job id; DEFAULT_PORT outside SLURM."""
    job = env.get("SLURM_JOB_ID", "")
    return SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN if job.isdigit() else DEFAULT_PORT


def _submitit_environment():
    """submitit's JobEnvironment of the running job, or None when submitit is missing or not running a job."""
    try:
        import submitit
    except ImportError:
        return None
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # "Could not figure out which environment the job is running in"
        return None


_GROUP = re.compile(r"([^,\[]*)(\[[^\]]*\])?([^,\[]*)")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: "gpu[01-03,7],login" -> ["gpu01", "gpu02", "gpu03", "gpu7", "login"].

    Handles comma-separated groups of the form prefix[ranges]suffix with zero-padded ranges, one bracket per group
    (what SLURM prints for ordinary clusters); `scontrol show hostnames` handles every form."""
    hosts: list[str] = []
    pos = 0
    text = nodelist.strip()
    while pos < len(text):
        m = _GROUP.match(text, pos)
        prefix, brackets, suffix = m.group(1), m.group(2), m.group(3)
        if m.end() == pos or (m.end() < len(text) and text[m.end()] != ","):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r} at position {pos}")
        if brackets is None:
            hosts.append(prefix + suffix)
        else:
            for part in brackets[1:-1].split(","):
                lo, _, hi = part.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise ValueError(f"cannot parse the range {part!r} in SLURM node list {nodelist!r}")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi or lo) + 1))
        pos = m.end() + 1
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` when available, else `expand_nodelist`."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # scontrol present but unusable (no slurm.conf, ...): parse it ourselves
    return expand_nodelist(nodelist)[0]


def init_distributed(
    backend: str | None = None, env: DistEnv | None = None, timeout: timedelta = timedelta(minutes=30)
) -> DistEnv:
    """Join the process group described by `env` (default: `DistEnv.from_env()`) and return it.

    backend: "nccl" when CUDA is available (each process then uses cuda:local_rank), else "gloo". A world of one
    is a no-op (no process group: `fit` trains without DDP); so is a process group that is already initialised."""
    env = env or DistEnv.from_env()
    if not env.is_distributed or dist.is_initialized():
        return env
    if not dist.is_available():
        raise RuntimeError(f"world size {env.world_size} needs torch.distributed, which this torch build lacks")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size, timeout=timeout
    )
    return env


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
