"""Pre-processor architectures of the papers' pre-processing defenses, each [0, 1] image -> [0, 1] image of the same
size: NRP's purifier (JATP's own network and its NRP baseline), HGD's U-Net denoiser, APE-G's generator and ARN's
auto-encoder; plus the training-only discriminators of APE-G and ARN. The adversarial transformation of Xiao & Zheng
2020 is not a network: it lives in :mod:`atscale.defenses.transform`."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from atscale.errors import ModelError
from atscale.models.preprocessors.apeg import APEDiscriminator, APEGenerator
from atscale.models.preprocessors.arn import (ARNDecoder, ARNEncoder, ARNNet, AttackDiscriminator,
                                              ImageDiscriminator)
from atscale.models.preprocessors.hgd import HGDUNet
from atscale.models.preprocessors.nrp import NRPNet

__all__ = ["PREPROCESSOR_NETS", "create_preprocessor", "NRPNet", "HGDUNet", "APEGenerator", "APEDiscriminator",
           "ARNNet", "ARNEncoder", "ARNDecoder", "AttackDiscriminator", "ImageDiscriminator"]

PREPROCESSOR_NETS: dict[str, Callable[..., nn.Module]] = {"nrp": NRPNet, "hgd_unet": HGDUNet, "ape_g": APEGenerator,
                                                          "arn": ARNNet}


def create_preprocessor(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The pre-processor network ``name`` (a key of :data:`PREPROCESSOR_NETS`) with its size arguments."""
    if name not in PREPROCESSOR_NETS:
        raise ModelError(f"defense.preprocessor = {name!r} is not a pre-processor network",
                         f"use one of {', '.join(PREPROCESSOR_NETS)}")
    try:
        return PREPROCESSOR_NETS[name](**(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ModelError(f"defense.kwargs {kwargs} are not accepted by the {name!r} pre-processor: {e}",
                         f"see {PREPROCESSOR_NETS[name].__module__}") from e
