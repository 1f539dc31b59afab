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

Other architectures (ConvNeXt, Swin, ViT / DeiT, XCiT: timm nets with ``set_grad_checkpointing``) fall back to timm's
own checkpointing of its blocks / stages (``model.set_grad_checkpointing(True)`` on the timm net inside
``NormalizedModel``). What is exact there and what is not:
- gradients: the recomputation runs the same ops on the same inputs, and torch's non-reentrant checkpoint replays the
  RNG state, so drop path / dropout draw the same masks: parameter and input gradients equal those without it;
- BatchNorm inside the checkpointed blocks (XCiT's patch embedding and LPI): its running statistics are saved before and
  restored after every forward that runs inside a backward pass (the recomputation), so they update once per forward;
- the pass state (``atscale.layers.context``) is NOT re-entered in the recomputation, so layers that read it there
  would see the state of the backward pass: a net with Mixture BN (``model.bn_domains``, e.g. on XCiT's BNs) or
  ``ReLUSoftplusGrad`` is refused here. LayerNorm models with no BN and no pass-dependent layer (ConvNeXt, Swin, ViT)
  are exact;
- ``update`` (``attack=False``): a forward pre-hook turns timm's flag off inside the attacker's passes and on outside;
- timm's reentrant mode (``TIMM_REENTRANT_CKPT=1``) cannot serve the attack's ``torch.autograd.grad`` and is refused.
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


def _timm_net(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))), None)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _save_bn_in_recompute(bn: nn.Module, args: Any) -> None:
    if _in_backward() and bn.training and bn.track_running_stats:
        bn.__dict__["_atscale_saved_stats"] = [t.clone() for t in (bn.running_mean, bn.running_var,
                                                                    bn.num_batches_tracked)]


def _restore_bn_after_recompute(bn: nn.Module, args: Any, out: Any) -> None:
    saved = bn.__dict__.pop("_atscale_saved_stats", None)
    if saved is not None:
        with torch.no_grad():
            for t, v in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), saved):
                t.copy_(v)


def _follow_attack_pass(net: nn.Module, args: Any) -> None:
    on = not in_attack()
    if net.__dict__.get("_atscale_timm_ckpt_on") != on:
        net.set_grad_checkpointing(on)
        net.__dict__["_atscale_timm_ckpt_on"] = on


_TIMM_HOOKS = (_save_bn_in_recompute, _restore_bn_after_recompute, _follow_attack_pass)


def _pass_dependent(net: nn.Module) -> list[str]:
    from atscale.layers.activations import ReLUSoftplusGrad
    from atscale.layers.mixture_bn import MixtureBatchNorm2d

    return sorted({type(m).__name__ for m in net.modules() if isinstance(m, (MixtureBatchNorm2d, ReLUSoftplusGrad))})


def _enable_timm_checkpointing(model: nn.Module, attack: bool) -> int:
    """timm's own ``set_grad_checkpointing`` for nets without the blocks above (see the module docstring)."""
    from timm.layers import use_reentrant_ckpt

    net = _timm_net(model)
    if net is None:
        raise ConfigError(f"perf.activation_checkpointing: {type(model).__name__} has no residual blocks this knows "
                          "(timm ResNet/ResNeXt, EfficientNet, denoising blocks) and no timm set_grad_checkpointing",
                          "set perf.activation_checkpointing=off for this architecture")
    if use_reentrant_ckpt():
        raise ConfigError("perf.activation_checkpointing with timm's reentrant checkpoints (TIMM_REENTRANT_CKPT=1): "
                          "they cannot serve the attack's input gradients (torch.autograd.grad)",
                          "unset TIMM_REENTRANT_CKPT")
    dependent = _pass_dependent(net)
    if dependent:
        raise ConfigError(f"perf.activation_checkpointing: timm's checkpointing of {type(net).__name__} would "
                          f"recompute {', '.join(dependent)} outside the pass they read (BN domain / attack pass)",
                          "set perf.activation_checkpointing=off, or drop model.bn_domains / the activation")
    disable_activation_checkpointing(model)
    try:
        net.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as e:
        raise ConfigError(f"perf.activation_checkpointing: timm's {type(net).__name__} does not support gradient "
                          f"checkpointing ({e})", "set perf.activation_checkpointing=off") from e
    flagged = sum(1 for m in net.modules() if getattr(m, "grad_checkpointing", False) is True)
    if flagged == 0:
        raise ConfigError(f"perf.activation_checkpointing: timm's {type(net).__name__}.set_grad_checkpointing "
                          "turned nothing on", "set perf.activation_checkpointing=off for this architecture")
    net.__dict__["_atscale_timm_ckpt_on"] = True
    for bn in net.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.register_forward_pre_hook(_save_bn_in_recompute)
            bn.register_forward_hook(_restore_bn_after_recompute)
    if not attack:
        net.register_forward_pre_hook(_follow_attack_pass)
    return flagged


def enable_activation_checkpointing(model: nn.Module, attack: bool = True) -> int:
    """Checkpoint every residual block (ResNet / ResNeXt bottlenecks and basic blocks, denoising blocks, EfficientNet
    blocks) of ``model`` in place, in the attack's passes too when ``attack``; returns how many. Any other timm net
    gets timm's ``set_grad_checkpointing`` instead (returns how many of its modules it flagged; exactness: module
    docstring). Raises ``ConfigError`` when the model has neither."""
    types = _block_types()
    n = 0
    for m in model.modules():
        if isinstance(m, types):
            if not isinstance(m, _Checkpointed):
                m.__class__ = _checkpointed_class(type(m))
            m._atscale_ckpt_attack = attack
            n += 1
    if n == 0:
        return _enable_timm_checkpointing(model, attack)
    return n


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo ``enable_activation_checkpointing``; returns how many blocks went back to their own class (timm's
    fallback: its flag turned off and the hooks removed)."""
    n = 0
    for m in model.modules():
        if isinstance(m, _Checkpointed):
            m.__class__ = type(m).__mro__[2]
            m.__dict__.pop("_atscale_ckpt_attack", None)
            n += 1
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if h in _TIMM_HOOKS]:
                del hooks[key]
        if m.__dict__.pop("_atscale_timm_ckpt_on", None) is not None:
            m.set_grad_checkpointing(False)
    return n
