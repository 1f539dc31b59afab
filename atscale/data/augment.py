"""Augmentation policies on device batches: AutoAugment (Cubuk et al. 2019), the training augmentation of
EfficientNet and AdvProp (Xie thesis Sec 7.5.1: "a fixed AutoAugment policy is applied to augment training images"),
and RandAugment (Cubuk et al. 2020), the augmentation of the DeiT / ConvNeXt / Swin recipes that the robust ImageNet
recipes inherit (ARES 2.0 robust_training, Liu et al. 2023). Those recipes use timm's ``rand-m9-mstd0.5-inc1`` (2 ops at
magnitude 9 with Gaussian magnitude noise, "increasing" op variants); this is torchvision's RandAugment, the paper's
fixed-magnitude form, with ``data.randaugment_ops`` ops at ``data.randaugment_magnitude``.

FFCV has neither, so they run after decoding, on the float [0, 1] NCHW batch on the training device: one independent
draw per image (torchvision's ``v2.AutoAugment`` with a fixed policy, ``v2.RandAugment(num_ops, magnitude)``). The
draws come from torch's generator forked and seeded from (seed, calls), and ``calls`` is carried by
``state_dict``, so a resumed run sees the same augmentations.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from atscale.errors import ConfigError

POLICIES = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar10": v2.AutoAugmentPolicy.CIFAR10,
            "svhn": v2.AutoAugmentPolicy.SVHN}


class _PerImageBatch:
    """``augment(x)`` -> a new batch with ``self.op`` applied to each image with its own random draw.

    The images are quantized to uint8 first (posterize / solarize / equalize are defined on 8-bit images), augmented,
    and returned as float [0, 1] in ``x``'s memory format. Call ``n`` draws from torch's generator seeded with
    seed * 1_000_003 + n inside a fork, so the global torch RNG is untouched and the draws depend on (seed, n) only.
    """

    op: v2.Transform

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4 \
            else torch.contiguous_format
        u8 = (x.detach() * 255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.calls)
            out = torch.stack([self.op(img) for img in u8])
        return out.float().div_(255.0).contiguous(memory_format=fmt)

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))


class AutoAugmentBatch(_PerImageBatch):
    """AutoAugment (Cubuk et al. 2019): one sub-policy of ``policy`` drawn per image."""

    def __init__(self, policy: str = "imagenet", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"AutoAugment policy {policy!r} is unknown; use one of {sorted(POLICIES)}")
        super().__init__(seed)
        self.policy = policy
        self.op = v2.AutoAugment(POLICIES[policy])


RANDAUGMENT_BINS = 31  # torchvision's default magnitude bins: magnitudes 0..30 (Cubuk et al. 2020 use a 0..30 scale)


class RandAugmentBatch(_PerImageBatch):
    """RandAugment (Cubuk et al. 2020, Sec 3): ``num_ops`` operations drawn uniformly per image from the 14 of the
    paper's search space, each at the shared ``magnitude`` (of 0..30), with a random sign where the op has one."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, seed: int = 0):
        if num_ops < 1:
            raise ConfigError(f"data.randaugment_ops = {num_ops}: RandAugment needs at least one op per image",
                              "set data.randaugment_ops >= 1 (2 in the ConvNeXt / Swin recipes), or 0 for off")
        if not 0 <= magnitude < RANDAUGMENT_BINS:
            raise ConfigError(f"data.randaugment_magnitude = {magnitude} is outside 0..{RANDAUGMENT_BINS - 1}",
                              "set data.randaugment_magnitude in 0..30 (9 in the ConvNeXt / Swin recipes)")
        super().__init__(seed)
        self.num_ops, self.magnitude = num_ops, magnitude
        self.op = v2.RandAugment(num_ops, magnitude, num_magnitude_bins=RANDAUGMENT_BINS)
