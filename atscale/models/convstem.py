"""ConvNeXt with a convolutional stem (ConvStem), registered with timm: ``convnext_{tiny,small,base,large}_convstem``.

Singh, Croce, Hein, "Revisiting Adversarial Training for ImageNet: Architectures, Training and Generalization across
Threat Models" (NeurIPS 2023, arXiv:2303.01870), Sec 3.1: replacing ConvNeXt's patchify stem (one 4x4 convolution,
stride 4, then LayerNorm) by a stack of overlapping 3x3 convolutions improves robustness. Each stem layer is a 3x3
convolution (padding 1, with bias) -> channels-first LayerNorm (eps 1e-6) -> GELU. The stems of the paper, as widths
relative to ``dims[0]`` (the first stage's width) and strides:

- ConvNeXt-T and -S (``dims[0]`` = 96): 48 and 96 channels, strides 2 and 2 (``ratios (0.5, 1.0)``);
- ConvNeXt-B (128) and -L (192): 64/96/128 and 96/144/192 channels, strides 2, 2, 1 (``ratios (0.5, 0.75, 1.0)``).

The overall stride stays 4 and the stem's output width stays ``dims[0]``, so the stages, head, ``feature_info`` and
timm's layer groups (``stem`` matches ``^stem``) are timm's ConvNeXt unchanged. The stem's convolutions keep PyTorch's
default initialization, as in the paper's code (the stem is swapped in after timm's init).

Keyword arguments on top of timm ``ConvNeXt``'s: ``stem_ratios`` (widths as fractions of ``dims[0]``, the last 1.0)
and ``stem_strides`` (their product 4). Because the widths are relative, a narrower twin (``dims=(16, ...)``) keeps
the stem's shape. timm records the creation kwargs as ``model_args``, so an exported folder reloads with
``timm.create_model('local-dir:<folder>', pretrained=True)`` once this module is imported (``import atscale.models``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.convnext import ConvNeXt
from torch import nn

from atscale.models.registry import named_entrypoint, register_variant

__all__ = ["CONVSTEM_MODELS", "ConvStem", "ConvStemConvNeXt"]

CONVSTEM_PAPER = "arXiv:2303.01870"
_TS_STEM = {"stem_ratios": (0.5, 1.0), "stem_strides": (2, 2)}
_BL_STEM = {"stem_ratios": (0.5, 0.75, 1.0), "stem_strides": (2, 2, 1)}
_DEEP = (3, 3, 27, 3)


class ConvStem(nn.Sequential):
    """3x3 conv -> LayerNorm2d -> GELU per entry of ``widths`` / ``strides`` (Singh et al. 2023, Sec 3.1)."""

    def __init__(self, in_chans: int, widths: Sequence[int], strides: Sequence[int], eps: float = 1e-6,
                 device: Any = None, dtype: Any = None) -> None:
        layers: list[nn.Module] = []
        prev = in_chans
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(prev, width, kernel_size=3, stride=stride, padding=1, device=device, dtype=dtype),
                       LayerNorm2d(width, eps=eps, device=device, dtype=dtype), nn.GELU()]
            prev = width
        super().__init__(*layers)


def stem_widths(dim: int, ratios: Sequence[float]) -> list[int]:
    """Channel widths of a ConvStem ending at ``dim`` (the first stage's width)."""
    return [max(1, round(dim * r)) for r in ratios]


class ConvStemConvNeXt(ConvNeXt):
    """timm ``ConvNeXt`` whose patchify stem is a ``ConvStem`` (built in the constructor, so ``state_dict`` keys and
    timm's strict weight loading see it)."""

    def __init__(self, *args: Any, stem_ratios: Sequence[float] = (0.5, 1.0), stem_strides: Sequence[int] = (2, 2),
                 **kwargs: Any) -> None:
        if len(stem_ratios) != len(stem_strides) or not stem_ratios:
            raise ValueError(f"stem_ratios {tuple(stem_ratios)} and stem_strides {tuple(stem_strides)} need one "
                             "entry per stem convolution")
        if math.prod(stem_strides) != 4 or float(stem_ratios[-1]) != 1.0:
            raise ValueError(f"a ConvNeXt stem must have overall stride 4 and end at dims[0] (last ratio 1.0); got "
                             f"strides {tuple(stem_strides)}, ratios {tuple(stem_ratios)}")
        if kwargs.get("stem_type", "patch") != "patch" or kwargs.get("patch_size", 4) != 4:
            raise ValueError("stem_type / patch_size do not apply to a ConvStem ConvNeXt; use stem_ratios and "
                             "stem_strides")
        super().__init__(*args, **kwargs)
        dims = kwargs.get("dims", (96, 192, 384, 768))
        self.stem = ConvStem(kwargs.get("in_chans", 3), stem_widths(int(dims[0]), stem_ratios), stem_strides,
                             device=kwargs.get("device"), dtype=kwargs.get("dtype"))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.0", "classifier": "head.fc", "paper_ids": CONVSTEM_PAPER, **kwargs}


_SPECS: dict[str, tuple[dict[str, Any], str]] = {
    "convnext_tiny_convstem": ({"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), **_TS_STEM},
                               "ConvNeXt-T + ConvStem 48/96 (Singh et al. 2023, Sec 3.1)."),
    "convnext_small_convstem": ({"depths": _DEEP, "dims": (96, 192, 384, 768), **_TS_STEM},
                                "ConvNeXt-S + ConvStem 48/96 (Singh et al. 2023, Sec 3.1)."),
    "convnext_base_convstem": ({"depths": _DEEP, "dims": (128, 256, 512, 1024), **_BL_STEM},
                               "ConvNeXt-B + ConvStem 64/96/128 (Singh et al. 2023, Sec 3.1)."),
    "convnext_large_convstem": ({"depths": _DEEP, "dims": (192, 384, 768, 1536), **_BL_STEM},
                                "ConvNeXt-L + ConvStem 96/144/192 (Singh et al. 2023, Sec 3.1)."),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in _SPECS})


def base_model_args(name: str) -> dict[str, Any]:
    """The architecture arguments registered ``name`` is built from before the caller's kwargs (a copy)."""
    return dict(_SPECS[name][0])


def _entrypoint(name: str, base: dict[str, Any], doc: str) -> Callable[..., ConvStemConvNeXt]:
    def fn(pretrained: bool = False, **kwargs: Any) -> ConvStemConvNeXt:
        model = build_model_with_cfg(ConvStemConvNeXt, name, pretrained,
                                     feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
                                     **{**base, **kwargs})
        model._model_args = {k: v for k, v in kwargs.items()
                             if k not in ("device", "dtype", "pretrained_model_args", "pretrained_cfg",
                                          "pretrained_cfg_overlay", "cache_dir")}
        return model

    return named_entrypoint(fn, name, __name__, doc)


def _register_all() -> tuple[str, ...]:
    return tuple(name for name, (base, doc) in _SPECS.items()
                 if register_variant(_entrypoint(name, base, doc), globals()))


CONVSTEM_MODELS: tuple[str, ...] = _register_all()
