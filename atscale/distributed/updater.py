"""Weight-update engines behind one interface: DDP (torch.distributed) or DeepSpeed ZeRO stage 1/2.

Synchronized SGD as in Feature Denoising (Xie thesis Sec 4.5: 128 GPUs x 32 images, one all-reduce per step). The
training loop only calls ``micro_batch(last)`` / ``backward(loss, last)``; the attack always runs on ``model`` (the
unwrapped module, frozen parameters), so attack steps never trigger gradient synchronization in either engine.

- ``DDPUpdater``: the model wrapped in DistributedDataParallel when distributed (plain otherwise; gradients as views
  into the all-reduce buckets by default, ``dist.gradient_as_bucket_view``); ``no_sync`` on all but the last
  micro-batch of a step, loss scaled by 1/accum, torch GradScaler for fp16.
- ``DeepSpeedUpdater``: a DeepSpeed engine (ZeRO stage 1 or 2) around the same model and optimizer, bf16/fp16 mixed
  precision with fp32 master weights on GPU; DeepSpeed divides by the accumulation steps and synchronizes at the
  boundary itself. Checkpoints go through ``engine.save_checkpoint`` (one optimizer partition per rank) into a folder
  beside the step file, written under a temporary name and renamed, and the step file names it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from atscale.distributed import env as dist
from atscale.errors import CheckpointError, ConfigError


class DDPUpdater:
    """Plain or DistributedDataParallel model, torch optimizer, optional GradScaler (fp16)."""

    engine = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, accum: int,
                 amp_dtype: torch.dtype | None, gradient_as_bucket_view: bool = True, bucket_cap_mb: float = 25.0,
                 clip_grad_norm: float = 0.0):
        self.model, self.optimizer, self.accum, self.clip = model, optimizer, accum, clip_grad_norm
        self.module: nn.Module = model
        if dist.is_dist():
            self.module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None,
                gradient_as_bucket_view=gradient_as_bucket_view, bucket_cap_mb=bucket_cap_mb)
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        optimizer.zero_grad(set_to_none=True)

    def micro_batch(self, last: bool) -> ContextManager:
        """Around forward and backward of one micro-batch: gradients are all-reduced only on the last one."""
        if last or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if not last:
            return
        if self.clip > 0:  # the global norm of the (all-reduced, unscaled) gradients
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, ckpt_dir: Path, step_name: str, main_rank: bool) -> dict[str, Any]:
        if not main_rank:
            return {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state(self, state: dict[str, Any], ckpt_dir: Path) -> None:
        if "deepspeed" in state:
            raise CheckpointError("this checkpoint was written by dist.engine=deepspeed; resume it with "
                                  "dist.engine=deepspeed (its optimizer state is partitioned in DeepSpeed's format)")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(micro_batch: int, accum: int, world: int, zero_stage: int,
                     amp_dtype: torch.dtype | None, clip_grad_norm: float = 0.0) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": amp_dtype == torch.bfloat16},
        "fp16": {"enabled": amp_dtype == torch.float16},
        "gradient_clipping": clip_grad_norm,
        "zero_allow_untested_optimizer": True,  # torch SGD (Nesterov) with our two weight-decay groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedUpdater:
    """A DeepSpeed ZeRO-1/2 engine around the model and the torch optimizer (learning rate still set per step)."""

    engine = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, accum: int,
                 amp_dtype: torch.dtype | None, micro_batch: int, zero_stage: int, clip_grad_norm: float = 0.0):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not dist.is_dist():
            raise RuntimeError("dist.engine=deepspeed needs an initialized process group (the run creates one)")
        if amp_dtype is not None and device.type != "cuda":
            raise ConfigError(f"dist.engine=deepspeed with run.amp={amp_dtype} needs a GPU",
                              "on CPU use run.amp=off (or auto)")
        cfg = deepspeed_config(micro_batch, accum, dist.world_size(), zero_stage, amp_dtype, clip_grad_norm)
        # ZeRO flattens parameters into contiguous buffers (and broadcasts them as bytes): channels_last stays on the
        # activations (the loader's batches), parameters go back to the default layout
        model = model.to(memory_format=torch.contiguous_format)
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        self.model = self.module.module
        self.accum = accum
        self.mixed = amp_dtype is not None

    def micro_batch(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.module.is_gradient_accumulation_boundary() != last:
            raise CheckpointError("DeepSpeed's accumulation counter disagrees with the loop's",
                                  "resume DeepSpeed runs from step checkpoints only (they are written at steps)")
        self.module.backward(loss)
        self.module.step()

    def save_state(self, ckpt_dir: Path, step_name: str, main_rank: bool) -> dict[str, Any]:
        """Every rank writes its ZeRO partition into ``<step_name>.ds``; rank 0 returns fp32 weights for the .pt."""
        final = ckpt_dir / f"{step_name}.ds"
        tmp_tag = f".{step_name}.ds.tmp"
        if main_rank:
            shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        dist.barrier()
        self.module.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
        dist.barrier()
        if not main_rank:
            return {}
        for f in (ckpt_dir / tmp_tag).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / tmp_tag, final)
        return {"model": self.fp32_state_dict(ckpt_dir, final.name), "deepspeed": final.name}

    def fp32_state_dict(self, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
        """The module's state with fp32 master weights (mixed precision keeps bf16/fp16 copies in the module)."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.mixed:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            state.update({k: v for k, v in fp32.items() if k in state})
        return state

    def load_state(self, state: dict[str, Any], ckpt_dir: Path) -> None:
        tag = state.get("deepspeed")
        if not tag:
            raise CheckpointError("this checkpoint was written by dist.engine=ddp; resume it with dist.engine=ddp "
                                  "(DeepSpeed needs its own partitioned optimizer state)")
        if state.get("world_size", dist.world_size()) != dist.world_size():
            raise CheckpointError(f"this DeepSpeed checkpoint holds ZeRO partitions for {state['world_size']} ranks; "
                                  f"resume it on {state['world_size']} ranks, not {dist.world_size()}")
        if not (ckpt_dir / tag).is_dir():
            raise CheckpointError(f"DeepSpeed state '{ckpt_dir / tag}' named by the checkpoint is missing; it is "
                                  "written beside step_*.pt, so copy the whole checkpoints/ folder")
        path, _ = self.module.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load '{ckpt_dir / tag}' (see its log above)")


def build_updater(dist_cfg, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  amp_dtype: torch.dtype | None, micro_batch: int,
                  clip_grad_norm: float = 0.0) -> DDPUpdater | DeepSpeedUpdater:
    """The engine of ``dist.engine``; ``clip_grad_norm`` > 0 clips the global gradient norm before each step."""
    if dist_cfg.engine == "deepspeed":
        return DeepSpeedUpdater(model, optimizer, device, dist_cfg.grad_accum, amp_dtype, micro_batch,
                                dist_cfg.zero_stage, clip_grad_norm)
    return DDPUpdater(model, optimizer, device, dist_cfg.grad_accum, amp_dtype, dist_cfg.gradient_as_bucket_view,
                      dist_cfg.bucket_cap_mb, clip_grad_norm)
