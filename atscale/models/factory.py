"""Build models with ``timm.create_model`` and wrap them with [0, 1] -> mean/std normalization."""
from __future__ import annotations

from typing import Any

import timm
import torch

from atscale.models.normalize import NormalizedModel


class ModelError(ValueError):
    """The requested architecture or its arguments are not usable."""


def create_model(arch: str, num_classes: int, mean, std, kwargs: dict[str, Any] | None = None,
                 channels_last: bool = True) -> NormalizedModel:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ModelError(f"model.arch = '{arch}' is not a timm model; close names: {close or 'none'} "
                         "(see timm.list_models())")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    except TypeError as e:
        raise ModelError(f"model.kwargs {kwargs} are not accepted by timm's '{arch}': {e}") from e
    model = NormalizedModel(net, mean, std)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_from_config(model_cfg, num_classes: int) -> NormalizedModel:
    return create_model(model_cfg.arch, model_cfg.num_classes or num_classes, model_cfg.mean, model_cfg.std,
                        model_cfg.kwargs, model_cfg.channels_last)
