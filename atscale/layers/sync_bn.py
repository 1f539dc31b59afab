"""Synchronized BatchNorm: statistics over the global batch of all ranks (Feature Denoising trains with per-GPU BN;
``dist.sync_bn`` is for small per-GPU batches), on any device and backend, gloo included.

``convert_sync_bn(model, device)`` replaces every BN layer:

- on CUDA, timm's converter: ``nn.BatchNorm*`` -> torch's ``SyncBatchNorm`` and timm's ``BatchNormAct2d`` (BN + its
  activation, EfficientNet) -> timm's ``SyncBatchNormAct``, so the activation is kept;
- elsewhere, ``nn.BatchNorm2d`` -> :class:`DistBatchNorm2d` and ``BatchNormAct2d`` -> :class:`DistBatchNormAct2d`
  (same drop and activation modules), which all-reduce per-channel sums with the differentiable
  ``torch.distributed.nn`` all-reduce, so gradients flow across ranks exactly as for one large batch.

Mixture BN (:mod:`atscale.layers.mixture_bn`) holds plain BNs per domain, which either converter reaches. A BN kind
that neither handles is refused rather than left unsynchronized. Imports torch and timm only.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from timm.layers import BatchNormAct2d
from torch import nn

from atscale.errors import ModelError
from atscale.layers.swap import swap_modules


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group) -> torch.Tensor:
    """``bn`` in training mode over the concatenation of every rank's ``x`` (N, C, H, W): mean and biased variance
    for normalization, unbiased variance into the running statistics, as ``nn.BatchNorm2d`` on the whole batch."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    xd = x.double()  # sum and sum of squares in float64: E[x^2] - E[x]^2 cancels badly in float32
    local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), xd.new_full((1,), x.numel() / c)])
    total = all_reduce(local, group=group or tdist.group.WORLD)
    n = total[-1]
    mean64 = total[:c] / n
    var = (total[c:2 * c] / n - mean64 * mean64).clamp_min(0).float()
    mean = mean64.float()
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
    shape = (1, c, 1, 1)
    y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class DistBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with training statistics over the global batch; a plain BN outside a multi-rank world.

    ``process_group``: its own group, so DDP's asynchronous bucket all-reduces on the default group never interleave
    with these backward-pass collectives in a different order on different ranks (gloo would hang)."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        return global_batch_norm(self, x, self.process_group)


class DistBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (BN, then its drop and activation) with global-batch training statistics."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        return self.act(self.drop(global_batch_norm(self, x, self.process_group)))


def _dist_copy(child: nn.Module, group) -> nn.Module:
    """``child`` as its global-batch class: same hyper-parameters, state, dtype, device, requires_grad and mode."""
    ref = child.weight if child.affine else child.running_mean
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    cls = DistBatchNormAct2d if isinstance(child, BatchNormAct2d) else DistBatchNorm2d
    new = cls(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
              track_running_stats=child.track_running_stats, **factory)
    if isinstance(child, BatchNormAct2d):
        new.act, new.drop = child.act, child.drop
    new.load_state_dict({k: v for k, v in child.state_dict().items() if "." not in k}, strict=False)
    for name, p in new.named_parameters(recurse=False):
        p.requires_grad_(getattr(child, name).requires_grad)
    new.train(child.training)
    new.process_group = group
    return new


def _swap(module: nn.Module, group) -> None:
    def dist(name: str, child: nn.Module) -> nn.Module | None:
        if isinstance(child, (DistBatchNorm2d, DistBatchNormAct2d, nn.SyncBatchNorm)):
            return child
        if type(child) is nn.BatchNorm2d or type(child) is BatchNormAct2d:
            return _dist_copy(child, group)
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise ModelError(f"dist.sync_bn cannot synchronize '{name}' ({type(child).__name__}) on this device",
                             "use a model with BatchNorm2d / timm BatchNormAct2d layers, or dist.sync_bn=false")
        return None

    swap_modules(module, dist)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BN of ``model`` -> its global-batch form (see the module docstring); a collective call on CPU (each rank
    creates the BN group at the same point). Returns the model (a new one on CUDA)."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    group = tdist.new_group() if _world() > 1 else None
    _swap(model, group)
    return model


__all__ = ["DistBatchNorm2d", "DistBatchNormAct2d", "convert_sync_bn", "global_batch_norm"]
