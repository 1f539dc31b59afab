"""The distributed world, read from the environment (torchrun or SLURM), and the collectives the engine needs.

Synchronized SGD as in Feature Denoising (Xie thesis Sec 4.5: 128 GPUs x 32 images, one all-reduce per step) via DDP.
Pure functions over the environment; nothing patches print. CPU runs use gloo, GPU runs NCCL.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from atscale.errors import RunEnvironmentError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | single | single-group (one rank with a process group)

    @property
    def distributed(self) -> bool:
        return self.source != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """torchrun / submitit-exported variables first (RANK, WORLD_SIZE, ...), then SLURM's (srun), else one process."""
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            world = int(env["WORLD_SIZE"])
            return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
                       source="torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                    or env.get("SLURM_NODELIST", "127.0.0.1"))
            job = int(env.get("SLURM_JOB_ID", "0") or 0)
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
            return cls(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                       world_size=int(env["SLURM_NTASKS"]), local_world_size=_first_tasks_per_node(per_node),
                       master_addr=env.get("MASTER_ADDR", nodes[0]),
                       master_port=int(env.get("MASTER_PORT", 20000 + job % 20000)), source="slurm")
        return cls()


def _first_tasks_per_node(text: str) -> int:
    """SLURM_TASKS_PER_NODE like '8(x2),4' -> 8."""
    m = re.match(r"(\d+)", text)
    return int(m.group(1)) if m else 1


def expand_nodelist(text: str) -> list[str]:
    """SLURM hostlist -> hosts: 'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[\]]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """run.device (auto | cpu | cuda) -> this rank's device: cuda:<local_rank> when CUDA is used."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunEnvironmentError("run.device = 'cuda' but no CUDA device is visible",
                                  "use run.device=auto or cpu, or run where a GPU is visible")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(env: DistEnv, device_pref: str = "auto", backend: str = "auto", timeout_min: float = 30,
         group_required: bool = False) -> torch.device:
    """Pick the device for this rank and, when distributed, join the process group. Returns the device.

    ``group_required``: a single process still gets a 1-rank group on a free loopback port (DeepSpeed needs one)."""
    device = resolve_device(device_pref, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.distributed and group_required and not dist.is_initialized():
        env = DistEnv(master_port=_free_port(), source="single-group")
    if env.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        for k, v in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(k, str(v))  # libraries that read the world from the environment (DeepSpeed)
        dist.init_process_group(backend_for(device) if backend == "auto" else backend, rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
