"""Datasets of the dense tasks that DAG attacks (Xie thesis Sec 2.3.3: segmentation and detection on Pascal VOC; Sec
2.4: the transfer experiments on the same sets), all yielding one item format:

``{"image": float (3, H, W) in [0, 1], "mask": long (H, W) with 255 = ignore, "boxes": float (K, 4) xyxy pixels,
"labels": long (K,) in 1..C-1, "ignore_boxes": float (M, 4), "ignore_labels": long (M,)}``; class 0 is the background.
Boxes are 0-based with exclusive ends (x2 = last column + 1), like :mod:`atscale.data.scenes`. ``ignore_*`` are the
objects VOC marks difficult: not trained on, not attacked, and neither a hit nor a miss in mAP (the VOC protocol;
empty for the scenes).

- :class:`SceneDataset`: the embedded digit scenes (no download).
- :class:`VOCDense`: Pascal VOC read from disk through torchvision (``download=False``: atscale never downloads VOC),
  resized to a fixed square (image bilinear, mask nearest, boxes scaled). The segmentation task has no boxes; the
  detection task has an all-ignore mask.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from atscale.data.scenes import NUM_CLASSES, Scenes, make_scenes
from atscale.errors import ConfigError, DatasetError

__all__ = ["IGNORE_INDEX", "SCENE_CLASSES", "VOC_CLASSES", "SceneDataset", "VOCDense", "collate_dense", "dense_loader",
           "dense_datasets", "dense_split"]

IGNORE_INDEX = 255
SCENE_CLASSES = ("background",) + tuple(str(d) for d in range(10))
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
_VOC_TARS = {
    "2012": "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "2007": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar (and "
            "VOCtest_06-Nov-2007.tar for image_set='test')",
}
_TASKS = {"segmentation": ("Segmentation", "SegmentationClass", ".png"), "detection": ("Main", "Annotations", ".xml")}


def _no_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)


def _item(image: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
          ignore: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    ignore_boxes, ignore_labels = ignore if ignore is not None else _no_boxes()
    return {"image": image, "mask": mask, "boxes": boxes, "labels": labels, "ignore_boxes": ignore_boxes,
            "ignore_labels": ignore_labels}


class SceneDataset(Dataset):
    """The embedded scenes of :func:`atscale.data.scenes.make_scenes` in the dense item format."""

    num_classes = NUM_CLASSES
    class_names = SCENE_CLASSES

    def __init__(self, scenes: Scenes):
        n = len(scenes.images)
        if not (len(scenes.masks) == len(scenes.boxes) == len(scenes.labels) == n):
            raise ConfigError(f"Scenes has {n} images, {len(scenes.masks)} masks, {len(scenes.boxes)} box lists and "
                              f"{len(scenes.labels)} label lists", "build it with make_scenes(...)")
        self.scenes = scenes

    @classmethod
    def from_args(cls, n: int, size: int = 64, split: str = "train", seed: int = 0, **kwargs: Any) -> "SceneDataset":
        """``cls(make_scenes(n, size=size, split=split, seed=seed, **kwargs))``."""
        return cls(make_scenes(n, size=size, split=split, seed=seed, **kwargs))

    def __len__(self) -> int:
        return len(self.scenes.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.scenes
        image = torch.from_numpy(np.ascontiguousarray(s.images[i])).permute(2, 0, 1).float().div_(255)
        return _item(image, torch.from_numpy(s.masks[i].astype(np.int64)),
                     torch.as_tensor(s.boxes[i], dtype=torch.float32).reshape(-1, 4),
                     torch.as_tensor(s.labels[i], dtype=torch.int64).reshape(-1))


def _voc_layout_error(root: Path, year: str, what: Path) -> DatasetError:
    return DatasetError(
        f"Pascal VOC not found: '{what}' is missing (expected <root>/VOCdevkit/VOC{year}/ with JPEGImages/, "
        f"SegmentationClass/ or Annotations/ and ImageSets/, root = '{root}')",
        f"atscale never downloads VOC: fetch and extract {_VOC_TARS.get(year, 'the VOC tar')} under '{root}' "
        "yourself, or pass the folder that holds VOCdevkit/ as root")


class VOCDense(Dataset):
    """Pascal VOC ``task`` ("segmentation" or "detection") from ``<root>/VOCdevkit/VOC<year>``, resized to
    ``size`` x ``size``. Objects VOC marks difficult go to ``ignore_boxes`` (VOC protocol: neither trained on nor
    counted by mAP), or, with ``keep_difficult``, count as ordinary objects."""

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(self, root: str | os.PathLike, task: str = "segmentation", year: str = "2012",
                 image_set: str = "train", size: int = 320, keep_difficult: bool = False):
        self.root, self.task, self.year, self.size = Path(root), task, str(year), int(size)
        self.keep_difficult = keep_difficult
        self._check_args(image_set)
        self._check_layout(image_set)
        from torchvision.datasets import VOCDetection, VOCSegmentation

        cls = VOCSegmentation if task == "segmentation" else VOCDetection
        self.base = cls(str(self.root), year=self.year, image_set=image_set, download=False)
        self._to_index = {name: i for i, name in enumerate(VOC_CLASSES)}

    def _check_args(self, image_set: str) -> None:
        if self.task not in _TASKS:
            raise ConfigError(f"VOC task {self.task!r} is not known", "use 'segmentation' or 'detection'")
        if self.year not in _VOC_TARS:
            raise ConfigError(f"VOC year {self.year!r} is not supported",
                              "use '2012' (segmentation, as in Xie Sec 2.3.3) or '2007' (detection)")
        sets = ("train", "val", "trainval") + (("test",) if self.year == "2007" else ())
        if image_set not in sets:
            raise ConfigError(f"VOC{self.year} image_set {image_set!r} is not known", f"use one of {', '.join(sets)}")
        if self.size < 8:
            raise ConfigError(f"VOC size = {self.size} is too small", "pass a square side of at least 8 pixels")

    def _check_layout(self, image_set: str) -> None:
        sets_dir, target_dir, ext = _TASKS[self.task]
        voc = self.root / "VOCdevkit" / f"VOC{self.year}"
        split = voc / "ImageSets" / sets_dir / f"{image_set}.txt"
        for need in (self.root, voc, voc / "JPEGImages", voc / target_dir, split):
            if not need.exists():
                raise _voc_layout_error(self.root, self.year, need)
        ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"VOC split file '{split}' lists no images", "restore it from the VOC tar")
        missing = [i for i in ids if not (voc / "JPEGImages" / f"{i}.jpg").exists()
                   or not (voc / target_dir / f"{i}{ext}").exists()]
        if missing:
            raise DatasetError(f"{len(missing)} of the {len(ids)} images listed in '{split}' lack their JPEG or "
                               f"{target_dir}/ file (first: {missing[0]})", "re-extract the VOC tar under the root")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, target = self.base[i]
        img = img.convert("RGB")
        w, h = img.size
        image = torch.from_numpy(np.asarray(img.resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8).copy())
        image = image.permute(2, 0, 1).float().div_(255)
        if self.task == "segmentation":
            m = np.asarray(target.resize((self.size, self.size), Image.NEAREST), dtype=np.uint8)
            if ((m >= self.num_classes) & (m != IGNORE_INDEX)).any():
                raise DatasetError(f"VOC mask {self.base.masks[i]} has values outside 0..20 and 255",
                                   "use the palette PNGs of SegmentationClass/, not coloured RGB renderings")
            return _item(image, torch.from_numpy(m.astype(np.int64)), *_no_boxes())
        (boxes, labels), ignore = self._objects(target, i)
        for b in (boxes, ignore[0]):
            b[:, 0::2] *= self.size / w
            b[:, 1::2] *= self.size / h
        mask = torch.full((self.size, self.size), IGNORE_INDEX, dtype=torch.long)
        return _item(image, mask, boxes, labels, ignore)

    def _objects(self, target: dict[str, Any], i: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                 tuple[torch.Tensor, torch.Tensor]]:
        """(boxes, labels) of the ordinary and of the ignored (difficult) objects: VOC's 1-based inclusive pixel boxes
        -> 0-based xyxy with exclusive ends (xmin - 1, ymin - 1, xmax, ymax)."""
        objs = target["annotation"].get("object", [])
        found: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
        for obj in objs if isinstance(objs, list) else [objs]:
            if obj["name"] not in self._to_index:
                raise DatasetError(f"VOC annotation {self.base.annotations[i]} names class {obj['name']!r}, not one "
                                   "of the 20 VOC classes", "fix the XML or use the official annotations")
            b = obj["bndbox"]
            boxes, labels = found[bool(int(obj.get("difficult", 0))) and not self.keep_difficult]
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
            labels.append(self._to_index[obj["name"]])
        ordinary, ignored = ((torch.tensor(bx, dtype=torch.float32).reshape(-1, 4), torch.tensor(lb, dtype=torch.long))
                             for bx, lb in (found[False], found[True]))
        return ordinary, ignored


def collate_dense(batch: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack images and masks; keep per-image boxes and labels (ordinary and ignored) as lists (their counts
    differ)."""
    if not batch:
        raise ValueError("collate_dense got an empty batch")
    sizes = {tuple(item["image"].shape) for item in batch}
    if len(sizes) > 1:
        raise ConfigError(f"a batch mixes image sizes {sorted(sizes)}",
                          "resize every image to one size (VOCDense(size=...)) or use batch_size=1")
    lists = {k: [b[k] for b in batch] for k in ("boxes", "labels", "ignore_boxes", "ignore_labels")}
    return {"image": torch.stack([b["image"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch]),
            **lists}


def dense_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                 distributed: bool = False) -> DataLoader:
    """A DataLoader with :func:`collate_dense` and a seeded order; with ``distributed`` and an initialized process
    group, a :class:`DistributedSampler` (the caller calls ``loader.sampler.set_epoch(epoch)``)."""
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size = {batch_size}, num_workers = {num_workers}",
                          "use batch_size >= 1 and num_workers >= 0")
    gen = torch.Generator().manual_seed(int(seed))
    sampler = None
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_dense, generator=gen)
    # no persistent workers: every epoch's iterator draws its worker seeds and then its order from ``gen``, so an
    # epoch reseeded by the trainer has the same order in an unbroken and in a resumed run


def dense_split(data: Any, task: str, split: str) -> Dataset:
    """The ``split`` ("train" or "val") of a data config (``atscale.config.dense.DenseDataCfg`` fields). Scenes:
    ``n_train`` / ``n_val`` scenes from ``seed`` / ``val_seed``; VOC: image sets train / val (2007: trainval / test,
    as in Xie Sec 2.3.3)."""
    if data.source == "scenes":
        n, seed = (data.n_train, data.seed) if split == "train" else (data.n_val, data.val_seed)
        return SceneDataset(make_scenes(n, size=data.image_size, split=split, max_digits=data.max_digits,
                                        scale=tuple(data.digit_size), seed=seed))
    if data.source == "voc":
        if not data.root:
            raise ConfigError("data.root is empty but data.source = 'voc'",
                              "set data.root to the folder holding VOCdevkit/")
        sets = {"train": "trainval", "val": "test"} if str(data.year) == "2007" else {"train": "train", "val": "val"}
        return VOCDense(data.root, task, str(data.year), sets[split], data.image_size)
    raise ConfigError(f"data.source = {data.source!r} is not a dense dataset", "use 'scenes' or 'voc'")


def dense_datasets(data: Any, task: str) -> tuple[Dataset, Dataset]:
    """(train, val): :func:`dense_split` of both."""
    return dense_split(data, task, "train"), dense_split(data, task, "val")
