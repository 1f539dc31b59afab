"""NRP's purifier: residual-in-residual dense blocks at full resolution (Naseer et al., "A Self-supervised Approach for
Adversarial Robustness", CVPR 2020, Sec 3.3; the generator of ESRGAN without its upsampling).

JATP (Zhou et al., ``zhou-jatp-...``, Sec 4 "Defense settings") uses this architecture with 3 basic blocks for its own
pre-processor and for the NRP baseline: ``NRPNet(blocks=3)``. A basic block (``RRDB``) is three dense blocks, each of
five 3x3 convolutions where every convolution sees the concatenation of all earlier outputs (``growth`` new channels
each), LeakyReLU 0.2 between them, and every residual branch scaled by 0.2 before it is added. The dense blocks'
convolutions start from Kaiming initialization scaled by 0.1, as ESRGAN's and NRP's code do, so the deep trunk starts
close to the identity and SGD at JATP's lr 1e-2 does not blow up.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DenseBlock", "RRDB", "NRPNet"]

RESIDUAL_SCALE = 0.2


class DenseBlock(nn.Module):
    """Five 3x3 convolutions with dense connections; ``x + 0.2 * conv5(...)``."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth if i < 4 else channels, 3, padding=1) for i in range(5))
        self.act = nn.LeakyReLU(0.2)
        for conv in self.convs:  # ESRGAN's initialization of dense blocks: Kaiming (fan-in) scaled by 0.1
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(self.act(out))
        return x + RESIDUAL_SCALE * out


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and an outer residual scaled by 0.2."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(DenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + RESIDUAL_SCALE * self.body(x)


class NRPNet(nn.Module):
    """[0, 1] image -> purified image of the same size: conv -> ``blocks`` RRDBs -> conv, a long skip around the
    trunk, then conv -> LeakyReLU -> conv to 3 channels. The output is not clamped (the purifier is trained to land in
    [0, 1]; a clamp would zero the gradient the attacks and the training need at the borders)."""

    def __init__(self, channels: int = 64, growth: int = 32, blocks: int = 3, in_chans: int = 3) -> None:
        super().__init__()
        if blocks < 1 or channels < 1 or growth < 1:
            raise ValueError(f"NRPNet needs blocks, channels and growth >= 1; got {blocks}, {channels}, {growth}")
        self.conv_first = nn.Conv2d(in_chans, channels, 3, padding=1)
        self.trunk = nn.Sequential(*(RRDB(channels, growth) for _ in range(blocks)))
        self.trunk_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_hr = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_last = nn.Conv2d(channels, in_chans, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.trunk(fea))
        return self.conv_last(self.act(self.conv_hr(fea)))
