"""The device runtime: autocast precision (``run.amp``) and the speed switches of the ``perf`` config section that act
on torch itself: cuDNN autotuning, TF32, ``torch.compile``. Layer: with distributed (imports config and errors only).

Adversarial training runs (2k+3) forward-equivalents per image for PGD-k (Xie thesis Sec 4.5: PGD-30 on ResNet-152 took
52 hours on 128 V100s), so the step's speed is the time to a robust model. The other switches live where they act:
bf16 autocast (``run.amp``, :func:`autocast`), channels_last (``model.channels_last``), frozen parameters
during the attack (``atscale.attacks.base.attack_mode``), fused optimizer (``atscale.training.optim.build_optimizer``), DDP
bucket views (``atscale.distributed.updater``), activation checkpointing (``atscale.layers.checkpointing``), FFCV prefetch
(``data.batches_ahead``). ``benchmarks/train_step.py`` and ``benchmarks/mfu.py`` measure each.
"""
from __future__ import annotations

import torch
from torch import nn

from atscale.errors import ConfigError, RunEnvironmentError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# compiled graphs per module: train / eval BN x attack (frozen parameters) / update x Mixture BN domains and splits
RECOMPILE_LIMIT = 64


def set_backend_flags(perf_cfg, device: torch.device) -> None:
    """cuDNN autotuning for the fixed input shapes of a run, and TF32 for what stays in fp32 (on CUDA only)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(perf_cfg.cudnn_benchmark)
    torch.backends.cuda.matmul.allow_tf32 = bool(perf_cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(perf_cfg.tf32)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` the model in place (``nn.Module.compile``: the attack and the optimizer both call the same
    module; parameter names and checkpoints are unchanged). ``mode`` is one of ``COMPILE_MODES``, or ``off``."""
    if mode == "off":
        return model
    if mode not in COMPILE_MODES:
        raise ConfigError(f"perf.compile = '{mode}' is unknown", f"use one of off, {', '.join(COMPILE_MODES)}")
    if not hasattr(model, "compile"):
        raise RunEnvironmentError(f"perf.compile = '{mode}' needs torch >= 2.2 (nn.Module.compile); this is torch "
                           f"{torch.__version__}: upgrade torch or set perf.compile = off")
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    model.compile(mode=mode, dynamic=False)
    return model


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """``run.amp`` -> the autocast dtype: auto = bf16 on CUDA, none (fp32) elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op context when ``dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
