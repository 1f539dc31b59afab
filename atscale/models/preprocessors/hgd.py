"""HGD's denoiser: the DUNET of Liao et al., "Defense against Adversarial Attacks Using High-Level Representation
Guided Denoiser" (CVPR 2018), Sec 3.2 and Fig. 3, a baseline of JATP (``zhou-jatp-...``, Sec 4).

A U-Net that predicts the adversarial noise and subtracts it: ``x_hat = x - dx_hat``. The forward (contracting) path
has one block per width of ``widths``: the first is C2 (two 3x3 conv-BN-ReLU), the others C3 (three, the first with
stride 2). The backward (expanding) path upsamples bilinearly by 2, concatenates the forward path's feature map of
that size (the lateral connection) and applies C3 (C2 at the last, full-resolution level) back to the narrower width.
A final 1x1 convolution gives the 3-channel ``-dx_hat``. Paper widths: 64, 128, 256, 256, 256.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HGDUNet"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block(cin: int, cout: int, convs: int, stride: int = 1) -> nn.Sequential:
    layers = _conv_bn_relu(cin, cout, stride)
    for _ in range(convs - 1):
        layers += _conv_bn_relu(cout, cout)
    return nn.Sequential(*layers)


class HGDUNet(nn.Module):
    """[0, 1] image -> ``x - dx_hat`` (same size; any size, the lateral maps fix the upsampled sizes)."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 256, 256), in_chans: int = 3) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"HGDUNet needs at least two positive widths; got {widths}")
        self.down = nn.ModuleList([_block(in_chans, widths[0], 2)] + [
            _block(widths[i - 1], widths[i], 3, stride=2) for i in range(1, len(widths))])
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i], 2 if i == 0 else 3) for i in reversed(range(len(widths) - 1)))
        self.noise = nn.Conv2d(widths[0], in_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for block in self.down:
            h = block(h)
            feats.append(h)
        for block, lateral in zip(self.up, reversed(feats[:-1])):
            h = F.interpolate(h, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, lateral], 1))
        return x + self.noise(h)
