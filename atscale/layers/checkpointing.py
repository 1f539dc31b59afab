"""Activation checkpointing per residual block: keep only each block's input, recompute its inside in backward.

Deep adversarial models are memory-bound (ResNet-152 with denoising blocks, Xie thesis Sec 4.5: 32 images per GPU);
checkpointing trades one extra forward of each block per backward for activation memory, so a GPU can hold a larger
batch. ``attack=True`` checkpoints the attacker's input-gradient passes too: a PGD-k step then costs (3k+4) instead of
(2k+3) forward-equivalents, and its peak memory falls by the most, since an attack pass keeps as many activations as
the update pass of a single batch. ``attack=False`` checkpoints only the optimizer's passes ((2k+4) forward
equivalents): enough where the update's batch is the larger one (mixed / MBN / AdvProp concatenate clean and
adversarial images). Two things make the recomputation exact here, where ``timm``'s ``set_grad_checkpointing`` is not:
- the pass state (attack pass, BN domain, domain split, evaluation; ``atscale.layers.context``) is captured at forward
  time and re-entered for the recomputation, which runs inside ``backward`` after the objective left those contexts;
- BatchNorm running statistics (and ``num_batches_tracked``) are restored after the recomputation, so a checkpointed
  block updates them once per forward, as without checkpointing.
Random ops (drop path) replay the same draws (torch's ``preserve_rng_state``). Blocks switch class in place, so
parameter names, ``state_dict`` keys, ``deepcopy`` (EMA) and checkpoints are unchanged; the EMA copy and evaluation
attacks keep checkpointing too (an evaluation batch may be larger than the training batch). ``torch.compile`` cannot
trace the recomputation context, so the config refuses the two together.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from atscale.errors import ConfigError
from atscale.layers.context import in_attack, snapshot


def _block_types() -> tuple[type, ...]:
    from timm.models import _efficientnet_blocks as eb
    from timm.models.resnet import BasicBlock, Bottleneck

    from atscale.layers.denoise import DenoiseBlock

    return (BasicBlock, Bottleneck, DenoiseBlock, eb.DepthwiseSeparableConv, eb.InvertedResidual, eb.EdgeResidual,
            eb.CondConvResidual, eb.UniversalInvertedResidual)


@contextlib.contextmanager
def _keep_bn_statistics(block: nn.Module) -> Iterator[None]:
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class _Checkpointed:
    """Mixin put in front of a block's class: ``forward`` under ``torch.utils.checkpoint`` when gradients are on (and,
    unless the block's ``_atscale_ckpt_attack`` is set, outside the attacker's passes)."""

    _atscale_ckpt_attack: bool = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward  # type: ignore[misc]
        if not torch.is_grad_enabled() or (not self._atscale_ckpt_attack and in_attack()):
            return forward(*args, **kwargs)
        restore = snapshot()

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            with restore(), _keep_bn_statistics(self):  # type: ignore[arg-type]
                yield

        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), recompute()), **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def enable_activation_checkpointing(model: nn.Module, attack: bool = True) -> int:
    """Checkpoint every residual block (ResNet / ResNeXt bottlenecks and basic blocks, denoising blocks, EfficientNet
    blocks) of ``model`` in place, in the attack's passes too when ``attack``; returns how many. Raises
    ``ValueError`` when the model has none of them."""
    types = _block_types()
    n = 0
    for m in model.modules():
        if isinstance(m, types):
            if not isinstance(m, _Checkpointed):
                m.__class__ = _checkpointed_class(type(m))
            m._atscale_ckpt_attack = attack
            n += 1
    if n == 0:
        raise ConfigError(f"perf.activation_checkpointing: {type(model).__name__} has no residual blocks this knows "
                         "(timm ResNet/ResNeXt, EfficientNet, denoising blocks); turn it off for this architecture")
    return n


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo ``enable_activation_checkpointing``; returns how many blocks went back to their own class."""
    n = 0
    for m in model.modules():
        if isinstance(m, _Checkpointed):
            m.__class__ = type(m).__mro__[2]
            m.__dict__.pop("_atscale_ckpt_attack", None)
            n += 1
    return n
