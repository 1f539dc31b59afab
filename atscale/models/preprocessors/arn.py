"""ARN's networks (Zhou et al., "Towards Defending
against Adversarial Examples via Attack-Invariant Features", ICML 2021, ``zhou-2021-attack-invariant-features-arn``,
Sec 3 and Fig. 2): encoder E, decoder G, attack discriminator D_A and image discriminator D_I.

The paper gives the roles and losses, not the layer sizes, so these are a plain convolutional auto-encoder: E is a
3x3 conv and two stride-2 4x4 convs (BN + LeakyReLU 0.2) to a ``code`` channel map at 1/4 resolution; G mirrors it
with two stride-2 transposed convs and a 3x3 conv to 3 channels through a sigmoid (restored [0, 1] image). D_A reads
the code and predicts one of the K seen attack types (Eq. 1); D_I reads an image and gives one real/fake logit
(Eq. 5). The defended model uses ``ARNNet`` = G(E(x)); the discriminators only exist during training.
Input sides must be multiples of 4.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ARNEncoder", "ARNDecoder", "ARNNet", "AttackDiscriminator", "ImageDiscriminator"]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ARNEncoder(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128), code: int = 128, in_chans: int = 3) -> None:
        super().__init__()
        w1, w2 = (int(w) for w in widths)
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, w1, 3, 1, 1), _act(),
            nn.Conv2d(w1, w2, 4, 2, 1, bias=False), nn.BatchNorm2d(w2), _act(),
            nn.Conv2d(w2, code, 4, 2, 1, bias=False), nn.BatchNorm2d(code), _act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ARN's encoder needs image sides that are multiples of 4; got {tuple(x.shape[-2:])}")
        return self.body(x)


class ARNDecoder(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128), code: int = 128, out_chans: int = 3) -> None:
        super().__init__()
        w1, w2 = (int(w) for w in widths)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(code, w2, 4, 2, 1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w2, w1, 4, 2, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.Conv2d(w1, out_chans, 3, 1, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class ARNNet(nn.Module):
    """The pre-processor of the defended model: ``decoder(encoder(x))``."""

    def __init__(self, widths: Sequence[int] = (64, 128), code: int = 128, in_chans: int = 3) -> None:
        super().__init__()
        self.encoder = ARNEncoder(widths, code, in_chans)
        self.decoder = ARNDecoder(widths, code, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AttackDiscriminator(nn.Module):
    """D_A: code map -> logits over the K seen attack types (Eq. 1)."""

    def __init__(self, code: int = 128, attacks: int = 1, width: int = 128) -> None:
        super().__init__()
        if attacks < 1:
            raise ValueError(f"the attack discriminator needs at least one seen attack type; got {attacks}")
        self.body = nn.Sequential(nn.Conv2d(code, width, 3, 2, 1), _act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, attacks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class ImageDiscriminator(nn.Module):
    """D_I: [0, 1] image -> one real/fake logit per image, [B] (Eq. 5)."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256), in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for w in (int(w) for w in widths):
            layers += [nn.Conv2d(prev, w, 4, 2, 1), _act()]
            prev = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)
