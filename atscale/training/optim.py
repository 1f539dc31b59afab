"""Optimizers (SGD with Nesterov momentum, TF-style RMSProp, AdamW, LAMB), weight decay on weights only, layer-wise lr
decay, and a per-iteration learning-rate schedule.

Feature Denoising (Xie thesis Sec 4.5) recipe: SGD, lr 0.1 x B/256 (linear scaling, Goyal et al. 2017) with 5 warmup
epochs, /10 at epochs 35, 70, 95; weight decay 1e-4 not applied to BN parameters and biases.
EfficientNet / AdvProp (Sec 7.5.1): RMSProp (decay 0.9, momentum 0.9, epsilon inside the root as in TensorFlow: timm's
``RMSpropTF``), lr 0.256 at batch 4096 (0.016 per 256) decaying by 0.97 every 2.4 epochs, weight decay 1e-5.
LAMB (You et al. 2020, layer-wise trust ratios for large batches; timm's ``Lamb``) takes AdamW's betas, epsilon and
parameter groups; its built-in global gradient clipping is off, as clipping is ``optim.clip_grad_norm``'s alone.

The lr schedule is a function of the fractional epoch (step / steps_per_epoch), so phases with other batch sizes
(``data.phases``) keep it continuous in epochs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from atscale.errors import ConfigError


def _no_decay_names(net: nn.Module) -> set[str]:
    """The model's own no-decay parameter names (timm: ``no_weight_decay()`` -> position embeddings, class tokens)."""
    fn = getattr(net, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups, [decay, no decay]: 1-d parameters (norms, biases) and the model's ``no_weight_decay()`` names go
    without decay unless ``decay_norm_and_bias``."""
    net = getattr(model, "net", model)
    skip = {id(p) for n, p in net.named_parameters() if n in _no_decay_names(net)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decay_norm_and_bias or (p.ndim > 1 and id(p) not in skip) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups over the wrapped timm net (each with ``lr_scale`` = layer_decay^(depth from
    the head); the loop multiplies the scheduled lr by it). Needs a timm model with layer groups."""
    from timm.optim import param_groups_layer_decay

    net = getattr(model, "net", model)
    if not hasattr(net, "group_matcher"):
        raise ConfigError(f"optim.layer_decay = {layer_decay} needs a timm model with layer groups "
                          f"(group_matcher); {type(net).__name__} has none", "set optim.layer_decay=1")
    own = {id(p) for p in net.parameters()}
    if any(id(p) not in own for p in model.parameters() if p.requires_grad):
        raise ConfigError("optim.layer_decay: the model has trainable parameters outside its timm net",
                          "set optim.layer_decay=1")
    return param_groups_layer_decay(net, weight_decay, no_weight_decay_list=_no_decay_names(net),
                                    layer_decay=layer_decay)


def use_fused(setting: str, optim_name: str, device: torch.device, engine: str = "ddp") -> bool:
    """``perf.fused_optimizer``: auto = fused SGD kernels on CUDA (one launch for all parameters) under DDP, foreach
    elsewhere (DeepSpeed steps its own flattened partitions: fused there only when asked for with ``on``)."""
    if setting == "on" and optim_name != "sgd":
        raise ConfigError(f"perf.fused_optimizer = on needs optim.name = sgd (atscale's fused path is torch's fused "
                          f"SGD), but optim.name = {optim_name}", "use perf.fused_optimizer = auto or off")
    return setting == "on" or (setting == "auto" and optim_name == "sgd" and device.type == "cuda" and engine == "ddp")


def build_optimizer(model: nn.Module, optim_cfg, global_batch: int, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov), RMSpropTF, AdamW or LAMB over ``param_groups`` (or :func:`layer_decay_groups`); ``fused`` picks
    torch's fused SGD kernels."""
    lr = optim_cfg.lr * global_batch / optim_cfg.ref_batch
    if optim_cfg.layer_decay < 1:
        groups = layer_decay_groups(model, optim_cfg.weight_decay, optim_cfg.layer_decay)
    else:
        groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_norm_and_bias)
    if optim_cfg.name == "rmsprop_tf":
        from timm.optim import RMSpropTF

        return RMSpropTF(groups, lr=lr, alpha=optim_cfg.rmsprop_decay, eps=optim_cfg.rmsprop_eps,
                         momentum=optim_cfg.momentum)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.adam_eps)
    if optim_cfg.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.adam_eps, max_grad_norm=None)
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                           fused=True if fused else None)


def lr_factor(step: int, steps_per_epoch: int, sched_cfg) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then step / cosine /
    exponential (staircase, counted from epoch 0 as EfficientNet's) / constant."""
    epoch = step / steps_per_epoch
    warm = sched_cfg.warmup_epochs
    if warm > 0 and epoch < warm:
        return (step + 1) / (warm * steps_per_epoch)
    if sched_cfg.name == "step":
        return sched_cfg.gamma ** sum(epoch >= m for m in sched_cfg.milestones)
    if sched_cfg.name == "cosine":
        t = (epoch - warm) / max(1e-8, sched_cfg.epochs - warm)
        lo = sched_cfg.min_lr_ratio
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if sched_cfg.name == "linear":  # with warmup: the triangular (one-cycle) schedule of "fast" training
        t = (epoch - warm) / max(1e-8, sched_cfg.epochs - warm)
        return max(0.0, 1.0 - t)
    if sched_cfg.name == "exponential":
        return sched_cfg.gamma ** math.floor(epoch / sched_cfg.decay_every_epochs)
    return 1.0
