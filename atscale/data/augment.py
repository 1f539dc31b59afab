"""AutoAugment on device batches (Cubuk et al. 2019), the training augmentation of EfficientNet and AdvProp (Xie thesis
Sec 7.5.1: "a fixed AutoAugment policy is applied to augment training images").

FFCV has no AutoAugment operation, so it runs after decoding, on the float [0, 1] NCHW batch on the training device:
one policy sub-policy drawn per image (torchvision's ``v2.AutoAugment`` with the ImageNet policy). The draws come
from a generator seeded by (seed, epoch, batch, rank), so a resumed run sees the same augmentations.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

POLICIES = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar10": v2.AutoAugmentPolicy.CIFAR10,
            "svhn": v2.AutoAugmentPolicy.SVHN}


class AutoAugmentBatch:
    """``augment(x)`` -> a new batch with an independently drawn AutoAugment sub-policy applied to each image.

    The images are quantized to uint8 first (the policy's posterize / solarize / equalize are defined on 8-bit
    images), augmented, and returned as float [0, 1] in ``x``'s memory format.
    """

    def __init__(self, policy: str = "imagenet", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"AutoAugment policy {policy!r} is unknown; use one of {sorted(POLICIES)}")
        self.policy = policy
        self.op = v2.AutoAugment(POLICIES[policy])
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
