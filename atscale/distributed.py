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
from torch import nn


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
        raise RuntimeError("run.device = 'cuda' but no CUDA device is visible; use run.device=auto or cpu")
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


class DistBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics over the global batch (all ranks), on any device and backend (gloo included).

    torch's SyncBatchNorm supports GPUs only; this computes per-channel sum, sum of squares and count locally and
    all-reduces them with the differentiable ``torch.distributed.nn`` all_reduce, so gradients flow across ranks exactly
    as for one large batch. Used for ``dist.sync_bn`` on CPU; on CUDA torch's SyncBatchNorm is used.
    """

    process_group = None  # its own group: DDP's asynchronous bucket all-reduces on the default group must not
    # interleave with these backward-pass collectives in a different order on different ranks (gloo would hang)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()  # sum and sum of squares in float64: E[x^2] - E[x]^2 cancels badly in float32
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), xd.new_full((1,), x.numel() / c)])
        total = all_reduce(local, group=self.process_group or dist.group.WORLD)
        n = total[-1]
        mean64 = total[:c] / n
        var = (total[c:2 * c] / n - mean64 * mean64).clamp_min(0).float()
        mean = mean64.float()
        xf = x.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm2d -> global-batch BN: torch's SyncBatchNorm on CUDA, DistBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    group = dist.new_group() if is_dist() else None  # collective: every rank converts at the same point
    _swap_bn(model, group)
    return model


def _swap_bn(module: nn.Module, group) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = DistBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.process_group = group
            setattr(module, name, new)
        else:
            _swap_bn(child, group)
