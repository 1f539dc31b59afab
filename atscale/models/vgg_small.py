"""``vgg_small``: the small VGG-style classifier used as the adversarial transformation's fixed model f_b (Xiao & Zheng,
"One Man's Trash is Another Man's Treasure: Resisting Adversarial Examples by Adversarial Examples", CVPR 2020,
``xiao-zheng-2020-adversarial-transformation-defense``, Sec 3.4 and 4: "f_b should be as simple as possible").

Stages of two 3x3 conv-BN-ReLU layers and a 2x2 max-pool, one stage per width of ``widths`` (default 32, 64, 128;
the paper's Appendix A.1 layer list is not in the text we have), then global average pooling and a linear classifier.
Registered with timm like the other variants, so it trains, exports and reloads as any atscale classifier.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from atscale.models.registry import named_entrypoint, register_variant

__all__ = ["VGGSmall", "VGG_SMALL_MODELS"]


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128),
                 drop_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for w in (int(w) for w in widths):
            for _i in range(2):
                layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                prev = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(prev, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, *_: Any) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"vgg_small": {
    "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (1, 1), "crop_pct": 1.0,
    "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
    "first_conv": "features.0", "classifier": "head"}})


def _vgg_small(pretrained: bool = False, **kwargs: Any) -> VGGSmall:
    model = build_model_with_cfg(VGGSmall, "vgg_small", pretrained, **kwargs)
    model._model_args = {k: v for k, v in kwargs.items()
                         if k not in ("device", "dtype", "pretrained_model_args", "pretrained_cfg",
                                      "pretrained_cfg_overlay", "cache_dir")}
    return model


VGG_SMALL_MODELS: tuple[str, ...] = tuple(
    n for n in ("vgg_small",) if register_variant(named_entrypoint(
        _vgg_small, n, __name__, "Small VGG-style f_b of the adversarial transformation (Xiao & Zheng 2020, "
        "Sec 3.4)."), globals()))
