"""Build models with ``timm.create_model`` and wrap them with [0, 1] -> mean/std normalization."""
from __future__ import annotations

from typing import Any, Sequence

import timm
import torch

from atscale.layers.mixture_bn import convert_to_mixture_bn, mixture_domains
from atscale.models.normalize import NormalizedModel


class ModelError(ValueError):
    """The requested architecture or its arguments are not usable."""


def create_model(arch: str, num_classes: int, mean, std, kwargs: dict[str, Any] | None = None,
                 channels_last: bool = True, bn_domains: Sequence[str] = (), eval_domain: str = "",
                 bn_momentum: float = 0.0) -> NormalizedModel:
    """timm model -> BN momentum (``bn_momentum`` > 0, torch convention) -> optional Mixture BN (one BN per domain in ``bn_domains``, evaluated with ``eval_domain`` or the
    first; Xie thesis Sec 6.4.2) -> [0, 1] normalization in front -> channels_last."""
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
        convert_to_mixture_bn(net, tuple(bn_domains), default=eval_domain or bn_domains[0])
        if not mixture_domains(net):
            raise ModelError(f"model.bn_domains = {list(bn_domains)} but '{arch}' has no BatchNorm layers to split "
                             "(GroupNorm models share one normalization); drop model.bn_domains or use a BN model")
    model = NormalizedModel(net, mean, std)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_from_config(model_cfg, num_classes: int) -> NormalizedModel:
    return create_model(model_cfg.arch, model_cfg.num_classes or num_classes, model_cfg.mean, model_cfg.std,
                        model_cfg.kwargs, model_cfg.channels_last, model_cfg.bn_domains, model_cfg.eval_domain,
                        model_cfg.bn_momentum)
