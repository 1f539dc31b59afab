"""Build models with ``timm.create_model`` and wrap them with [0, 1] -> mean/std normalization."""
from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import nn

from atscale.errors import ModelError
from atscale.layers.mixture_bn import convert_to_mixture_bn, mixture_domains
from atscale.models.normalize import NormalizedModel

__all__ = ["ModelError", "build_from_config", "create_model", "has_batchnorm", "norm_kinds", "require_batchnorm"]


def norm_kinds(model: nn.Module) -> list[str]:
    """Class names of the normalization layers in ``model`` (for messages: LayerNorm2d, GroupNorm, ...)."""
    def is_norm(m: nn.Module) -> bool:
        name = type(m).__name__
        leaf = next(m.children(), None) is None
        return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or (
            leaf and "Norm" in name and "Normalize" not in name)

    return sorted({type(m).__name__ for m in model.modules() if is_norm(m)})


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def require_batchnorm(model: nn.Module, why: str) -> None:
    """Refuse a BatchNorm-only feature on a model without BatchNorm: Mixture BN / AdvProp (Xie thesis Sec 6.4.2,
    Chapter 7), BN train/test consistency (``schedule.bn_eval_last_epochs``, Sec 6.4.3) or ``dist.sync_bn``.
    LayerNorm / GroupNorm models (ConvNeXt, Swin, ViT, ...) have no batch statistics to split, freeze or sync.
    ``why`` names the config key, e.g. ``"schedule.bn_eval_last_epochs = 2"``."""
    if has_batchnorm(model):
        return
    net = getattr(model, "net", model)
    kinds = ", ".join(norm_kinds(net)) or "no normalization layers"
    raise ModelError(f"{why} needs BatchNorm layers, but {type(net).__name__} has none ({kinds}: no batch "
                     "statistics to use)", f"turn {why.split()[0]} off for this architecture or use a BatchNorm model")


def create_model(arch: str, num_classes: int, mean, std, kwargs: dict[str, Any] | None = None,
                 channels_last: bool = True, bn_domains: Sequence[str] = (), eval_domain: str = "",
                 bn_momentum: float = 0.0) -> NormalizedModel:
    """timm model -> BN momentum (``bn_momentum`` > 0, torch convention) -> optional Mixture BN (one BN per domain in
    ``bn_domains``, evaluated with ``eval_domain`` or the first; Xie thesis Sec 6.4.2; a model without BatchNorm is
    refused by ``require_batchnorm``) -> [0, 1] normalization in front -> channels_last."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ModelError(f"model.arch = '{arch}' is not a timm model; close names: {close or 'none'} "
                         "(see timm.list_models())")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ModelError(f"model.kwargs {kwargs} are not accepted by timm's '{arch}': {e}") from e
    if bn_momentum > 0:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    if bn_domains:
        require_batchnorm(net, f"model.bn_domains = {list(bn_domains)} (Mixture BN / AdvProp of '{arch}')")
        convert_to_mixture_bn(net, tuple(bn_domains), default=eval_domain or bn_domains[0])
        if not mixture_domains(net):
            raise ModelError(f"model.bn_domains = {list(bn_domains)}: no BatchNorm layer of '{arch}' could be split",
                             "drop model.bn_domains or use a model with BatchNorm2d layers")
    model = NormalizedModel(net, mean, std)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_from_config(model_cfg, num_classes: int) -> NormalizedModel:
    return create_model(model_cfg.arch, model_cfg.num_classes or num_classes, model_cfg.mean, model_cfg.std,
                        model_cfg.kwargs, model_cfg.channels_last, model_cfg.bn_domains, model_cfg.eval_domain,
                        model_cfg.bn_momentum)
