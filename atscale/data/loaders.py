"""FFCV loaders: JPEG/raw decode + crop in FFCV; on GPU uint8 to the device and float [0, 1] channels_last there, on
CPU the float conversion in FFCV's worker threads. FFCV decodes ``data.batches_ahead`` batches ahead in the background.

Train: random-resized crop (or center crop) and a horizontal flip drawn from a torch generator seeded by
(seed, epoch, batch), so flips are reproducible and a resumed epoch sees the same flips. The sample order is FFCV's,
seeded by ``seed + epoch``. Val: center crop, sequential order. Decoding and cropping are FFCV's numba code; the random
crop is seeded per image (``atscale.data.crop``), so a run's crops are reproducible too.
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

    def _flip_index(self, n: int, batch_idx: int) -> torch.Tensor:
        """Indices of the images to mirror, drawn on the CPU from (seed, epoch, batch) and sent to the device."""
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + batch_idx)
        return (torch.rand(n, generator=g) < 0.5).nonzero().view(-1).to(self.device, non_blocking=True)

    def _to_float(self, img: torch.Tensor) -> torch.Tensor:
        """A float [0, 1] batch of our own: FFCV reuses its output buffers, so every yielded batch is a fresh tensor."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        img = img.to(self.device, non_blocking=True)
        if img.dtype == torch.uint8:  # GPU: uint8 crossed the bus (4x fewer bytes); one conversion kernel there
            return torch.empty(img.shape, dtype=torch.float32, device=img.device, memory_format=fmt) \
                .copy_(img).div_(255.0)
        return img.clone(memory_format=fmt)  # CPU: FFCV's worker threads already converted (NormalizeImage)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = self.epoch
        for i, (img, label) in enumerate(self.loader):
            x = self._to_float(img)
            if self.flip:
                idx = self._flip_index(x.shape[0], i)
                x[idx] = x[idx].flip(3)
            # FFCV reuses its batch buffers: copy the labels so a batch stays valid after the next one is read
            yield x, label.to(self.device, torch.long, non_blocking=True, copy=True).view(-1)


def make_loader(root: str | Path, split: str, data_cfg, device: torch.device, seed: int, train: bool,
                channels_last: bool = True, rank: int = 0, world_size: int = 1) -> DeviceLoader:
    """FFCV loader for one rank. Train: the sharded order (each rank a disjoint part of every epoch, reshuffled per
    epoch from the shared seed, world-size invariant global batches). Val: the strided shard ``rank::world_size`` in order, so every
    image is evaluated exactly once across ranks (no padding, no dropped remainder)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

    from atscale.data.crop import SeededRandomResizedCrop

    path = Path(root) / f"{split}.beton"
    if train and data_cfg.train_crop == "random_resized":
        size = data_cfg.image_size
        decoder = SeededRandomResizedCrop((size, size), seed, scale=tuple(data_cfg.rrc_scale))
    else:
        size = data_cfg.image_size if train else data_cfg.val_size
        decoder = CenterCropRGBImageDecoder((size, size), ratio=data_cfg.val_crop_ratio)
    if device.type == "cuda":  # uint8 to the device, converted there
        image_ops = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    else:  # float [0, 1] in FFCV's parallel worker threads (a lookup table, exactly x / 255), not the main process
        image_ops = [NormalizeImage(np.zeros(3), np.full(3, 255.0), np.float32), ToTensor(),
                     ToTorchImage(channels_last=True)]
    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    pipelines = {"image": [decoder, *image_ops],
                 "label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]}
    indices = None
    if not train and world_size > 1:
        from ffcv.reader import Reader

        indices = np.arange(Reader(str(path)).num_samples, dtype=np.uint64)[rank::world_size]  # FFCV wants uint64
    loader = Loader(str(path), batch_size=data_cfg.batch_size if train else data_cfg.eval_batch_size,
                    num_workers=data_cfg.num_workers,
                    order=_sharded_order(rank, world_size) if train else OrderOption.SEQUENTIAL,
                    drop_last=train, seed=seed, indices=indices, pipelines=pipelines, os_cache=True,
                    batches_ahead=data_cfg.batches_ahead)
    return DeviceLoader(loader, device, flip=train and data_cfg.flip, seed=seed + 7919 * rank,
                        channels_last=channels_last)
