"""APE-GAN's generator and discriminator (Jin et al., "APE-GAN: Adversarial Perturbation Elimination with GAN",
ICASSP 2019, Sec 3 and its CIFAR-10 architecture), a baseline of JATP (``zhou-jatp-...``, Sec 4).

Generator: two stride-2 4x4 convolutions (64, 128 channels; LeakyReLU 0.2, BN on the second), two stride-2 4x4
transposed convolutions back (64 channels with BN + ReLU, then 3), tanh. APE-GAN works on [-1, 1] images; here the
tanh output is mapped to [0, 1] as ``(tanh + 1) / 2`` and the input to [-1, 1] as ``2x - 1``, so the module takes and
returns [0, 1] images like every pre-processor. Input sides must be multiples of 4.
Discriminator: stride-2 4x4 convolutions of 64, 128, 256 channels (BN after the last two, LeakyReLU 0.2), global
average pooling and one logit (real = natural image).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["APEGenerator", "APEDiscriminator"]


class APEGenerator(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128), in_chans: int = 3) -> None:
        super().__init__()
        w1, w2 = (int(w) for w in widths)
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, w1, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w1, w2, 4, 2, 1, bias=False), nn.BatchNorm2d(w2), nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(w2, w1, 4, 2, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w1, in_chans, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"APE-G's generator needs image sides that are multiples of 4; got {tuple(x.shape[-2:])}")
        return (self.body(2 * x - 1) + 1) / 2


class APEDiscriminator(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128, 256), in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, w in enumerate(int(w) for w in widths):
            layers += [nn.Conv2d(prev, w, 4, 2, 1, bias=i == 0)] + ([nn.BatchNorm2d(w)] if i else [])
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            prev = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One real/fake logit per image, [B]."""
        return self.body(2 * x - 1).squeeze(1)
