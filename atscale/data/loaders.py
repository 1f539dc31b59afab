"""FFCV loaders: JPEG/raw decode + crop in FFCV, uint8 to the device, then float [0, 1] channels_last there.

Train: random-resized crop (or center crop) and a horizontal flip drawn from a torch generator seeded by
(seed, epoch, batch), so flips are reproducible and a resumed epoch sees the same flips. The sample order is FFCV's,
seeded by ``seed + epoch``. Val: center crop, sequential order. Decoding and cropping are FFCV's numba code, whose
random crop draws from numba's own generator (not seeded by us).
Distributed: train uses one shared permutation per epoch split across ranks; val uses the strided shard of each rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def _sharded_order(rank: int, world_size: int):
    """FFCV TraversalOrder: one permutation per epoch from (seed + epoch), shared by all ranks; rank r takes
    ``perm[r::world]`` after dropping the tail that does not divide evenly. With global batch B x world the union of the
    ranks' i-th batches is the same set for every world size, so a 1-process and an N-process run see the same batches.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedRandom(TraversalOrder):
        def __init__(self) -> None:  # FFCV calls the instance with the loader (see ``__call__``)
            pass

        def __call__(self, loader) -> "ShardedRandom":
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            order = self.indices[np.random.default_rng(self.seed + epoch).permutation(len(self.indices))]
            return order[: len(order) - len(order) % world_size][rank::world_size]

    return ShardedRandom()


class DeviceLoader:
    """Wraps an FFCV Loader: yields (x float [0,1] NCHW channels_last, y int64) on the device, with epoch control."""

    def __init__(self, loader, device: torch.device, flip: bool, seed: int, channels_last: bool = True):
        self.loader = loader
        self.device = device
        self.flip = flip
        self.seed = seed  # flips: distinct per rank (make_loader mixes the rank in); the sample order uses FFCV's seed
        self.channels_last = channels_last
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _flip_mask(self, n: int, batch_idx: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + batch_idx)
        return (torch.rand(n, generator=g) < 0.5).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = self.epoch
        for i, (img, label) in enumerate(self.loader):
            x = img.to(self.device, non_blocking=True).float().div_(255.0)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            if self.flip:
                m = self._flip_mask(x.shape[0], i).view(-1, 1, 1, 1)
                x = torch.where(m, x.flip(3), x)
            # FFCV reuses its batch buffers: copy the labels so a batch stays valid after the next one is read
            yield x, label.to(self.device, torch.long, non_blocking=True, copy=True).view(-1)


def make_loader(root: str | Path, split: str, data_cfg, device: torch.device, seed: int, train: bool,
                channels_last: bool = True, rank: int = 0, world_size: int = 1) -> DeviceLoader:
    """FFCV loader for one rank. Train: the sharded order (each rank a disjoint part of every epoch, reshuffled per
    epoch from the shared seed, world-size invariant global batches). Val: the strided shard ``rank::world_size`` in order, so every
    image is evaluated exactly once across ranks (no padding, no dropped remainder)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    path = Path(root) / f"{split}.beton"
    if train and data_cfg.train_crop == "random_resized":
        size = data_cfg.image_size
        decoder = RandomResizedCropRGBImageDecoder((size, size), scale=tuple(data_cfg.rrc_scale))
    else:
        size = data_cfg.image_size if train else data_cfg.val_size
        decoder = CenterCropRGBImageDecoder((size, size), ratio=data_cfg.val_crop_ratio)
    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    pipelines = {"image": [decoder, ToTensor(), *to_dev, ToTorchImage(channels_last=True)],
                 "label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]}
    indices = None
    if not train and world_size > 1:
        from ffcv.reader import Reader

        indices = np.arange(Reader(str(path)).num_samples, dtype=np.uint64)[rank::world_size]  # FFCV wants uint64
    loader = Loader(str(path), batch_size=data_cfg.batch_size if train else data_cfg.eval_batch_size,
                    num_workers=data_cfg.num_workers,
                    order=_sharded_order(rank, world_size) if train else OrderOption.SEQUENTIAL,
                    drop_last=train, seed=seed, indices=indices, pipelines=pipelines, os_cache=True)
    return DeviceLoader(loader, device, flip=train and data_cfg.flip, seed=seed + 7919 * rank,
                        channels_last=channels_last)
