"""RobustBench-exact evaluation data: the val JPEGs of an ImageFolder, decoded by PIL and pre-processed by torchvision
exactly as RobustBench does (Croce et al. 2021, "RobustBench: a standardized adversarial robustness benchmark";
``robustbench/data.py`` ``PREPROCESSINGS``, ``robustbench/loaders.py`` ``CustomImageFolder``).

Each file is opened with PIL and converted to RGB, then one of RobustBench's transform chains runs on it:

- ``Res256Crop224``: ``Resize(256)`` (bilinear, shorter side to 256), ``CenterCrop(224)``, ``ToTensor()``
- ``BicubicRes256Crop224``: the same with ``Resize(256, interpolation=BICUBIC)`` (RobustBench's ImageNet default
  since its switch to bicubic, which moved its ImageNet models by about 2 points)
- ``Crop288``: ``CenterCrop(288)``, ``ToTensor()``
- ``Res224``: ``Resize([224, 224])`` (both sides, aspect ratio not kept), ``ToTensor()``
- ``none``: ``ToTensor()`` only (RobustBench's ``None`` entry, its CIFAR pre-processing); every image must have one size

Labels are the run's class indices, matched by class folder name (``meta.json``'s ``classes``), so a folder tree whose
sorted names differ from the run's never shifts a label. The image list is RobustBench's helper file
(``helper_files/imagenet_test_image_ids.txt``: one ``<class folder>/<file>`` per line, relative to the val folder,
5000 lines for its ImageNet subset), read in file order as RobustBench does; without it every image of every class
folder is used in torchvision ``ImageFolder`` order. Batches come out as float [0, 1] NCHW on the device, like
:class:`atscale.data.loaders.DeviceLoader`'s; files that do not decode are skipped, counted and listed, never fatal.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from atscale.data.sources import IMG_EXTENSIONS
from atscale.errors import ConfigError, DatasetError

PREPROCESSINGS = ("Res256Crop224", "BicubicRes256Crop224", "Crop288", "Res224", "none")


def robustbench_transform(name: str) -> Callable[[Image.Image], torch.Tensor]:
    """RobustBench's ``PREPROCESSINGS[name]`` as a torchvision ``Compose`` (``none`` is its ``None`` entry)."""
    from torchvision import transforms as T

    chains = {"Res256Crop224": lambda: [T.Resize(256), T.CenterCrop(224)],
              "BicubicRes256Crop224": lambda: [T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                                               T.CenterCrop(224)],
              "Crop288": lambda: [T.CenterCrop(288)],
              "Res224": lambda: [T.Resize([224, 224])],
              "none": lambda: []}
    if name not in chains:
        raise ConfigError(f"eval.preprocess = {name!r} is not one of RobustBench's pre-processings",
                          f"use one of {', '.join(PREPROCESSINGS)} (or ffcv for the run's .beton val loader)")
    return T.Compose([*chains[name](), T.ToTensor()])


def _folder_images(folder: Path) -> list[str]:
    """torchvision ``ImageFolder`` order: sorted walk (links followed), sorted names, image extensions only."""
    out = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        out += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return out


def _all_images(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown, missing = sorted(set(folders) - set(classes)), [c for c in classes if c not in set(folders)]
    if unknown:
        raise DatasetError(f"'{root}' has class folders the run was not trained on: {unknown[:5]}"
                           f"{' ...' if len(unknown) > 5 else ''} (the run's classes: {list(classes)[:5]} ...)",
                           "point eval.jpeg_root at the val folder of the run's dataset, or list the images to use "
                           "in eval.image_list")
    if missing:
        raise DatasetError(f"'{root}' lacks the class folder(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"of the run's {len(classes)} classes",
                           "give the complete val folder (eval.jpeg_root), or list the images to use in "
                           "eval.image_list")
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[c]) for c in folders for f in _folder_images(root / c)]


def _listed_images(root: Path, classes: Sequence[str], image_list: Path) -> list[tuple[str, int]]:
    """RobustBench's helper-file format: ``<class folder>/<file>`` per line, relative to the val folder."""
    if not image_list.is_file():
        raise ConfigError(f"eval.image_list '{image_list}' does not exist",
                          "give RobustBench's helper_files/imagenet_test_image_ids.txt (or a file in its format)")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for n, line in enumerate(image_list.read_text().splitlines(), 1):
        rel = line.strip()
        if not rel:
            continue
        cls = rel.split("/")[0]
        if "/" not in rel or rel.startswith("/") or ".." in rel.split("/"):
            raise DatasetError(f"line {n} of '{image_list}' ({rel!r}) is not '<class folder>/<file>'",
                               "write one relative path per line, e.g. n01440764/ILSVRC2012_val_00000293.JPEG")
        if cls not in index:
            raise DatasetError(f"line {n} of '{image_list}' ({rel!r}) names class folder {cls!r}, which is not one "
                               f"of the run's {len(classes)} classes ({list(classes)[:5]} ...)",
                               "use the image list of the run's dataset, or remove the line")
        if not (root / rel).is_file():
            raise DatasetError(f"line {n} of '{image_list}' names '{root / rel}', which does not exist",
                               "point eval.jpeg_root at the val folder the list is relative to (it holds "
                               "<class folder>/<file>)")
        samples.append((str(root / rel), index[cls]))
    if not samples:
        raise DatasetError(f"eval.image_list '{image_list}' lists no images", "give a file with one image per line")
    return samples


def list_samples(root: str | Path, classes: Sequence[str], image_list: str | Path = "") -> list[tuple[str, int]]:
    """The (file, run class index) pairs to evaluate, in RobustBench's order (the list's) or ``ImageFolder``'s."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"val image folder '{root}' does not exist",
                           "set eval.jpeg_root to an ImageFolder of val images (<root>/<class>/<file>.JPEG)")
    if not classes:
        raise DatasetError("the run's dataset meta.json records no class names, so val folders cannot be matched "
                           "to labels", "rebuild the dataset with `atscale data` (it records the classes)")
    return _listed_images(root, classes, Path(image_list)) if image_list else _all_images(root, classes)


class JpegDataset(torch.utils.data.Dataset):
    """(image tensor or None when the file does not decode, label, file) per sample; PIL decoding as RobustBench's
    ``pil_loader``: open, ``convert("RGB")``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f, Image.open(f) as im:
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - a file that does not decode is skipped and listed, never fatal
            return None, label, path
        return self.transform(img), label, path


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    ok = [(x, y) for x, y, _ in items if x is not None]
    skipped = [p for x, _, p in items if x is None]
    if not ok:
        return None, torch.empty(0, dtype=torch.long), skipped
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok], dtype=torch.long), skipped


def _same_size(samples: Sequence[tuple[str, int]]) -> None:
    """``none`` keeps every image's own size, so a batch needs one size (read from the headers only)."""
    sizes: dict[tuple[int, int], str] = {}
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                sizes.setdefault(im.size, path)
        except Exception:  # noqa: BLE001 - reported as skipped when the loader reaches it
            continue
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise DatasetError(f"eval.preprocess=none keeps each image's size, but '{pa}' is {a[0]}x{a[1]} and "
                               f"'{pb}' is {b[0]}x{b[1]}", "use a resizing pre-processing such as "
                                                           "BicubicRes256Crop224, or images of one size")


class JpegEvalLoader:
    """Batches (x float [0, 1] NCHW on ``device``, channels_last when asked; y int64) of this rank's strided shard
    ``samples[rank::world_size]``; ``skipped`` lists the files that did not decode so far."""

    def __init__(self, samples: Sequence[tuple[str, int]], preprocess: str, device: torch.device, *,
                 batch_size: int, num_workers: int = 0, channels_last: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if preprocess == "none":
            _same_size(samples)
        self.device, self.channels_last, self.skipped = device, channels_last, []
        self.samples = list(samples)[rank::world_size]
        self.loader = torch.utils.data.DataLoader(
            JpegDataset(self.samples, robustbench_transform(preprocess)), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
            persistent_workers=False)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y, skipped in self.loader:
            self.skipped += skipped
            if x is None:
                continue
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(self.device, non_blocking=True))


def make_jpeg_loader(root: str | Path, classes: Sequence[str], preprocess: str, device: torch.device, *,
                     image_list: str | Path = "", batch_size: int = 100, num_workers: int = 0,
                     channels_last: bool = True, rank: int = 0, world_size: int = 1) -> JpegEvalLoader:
    """The val JPEGs of ``root`` (or the ``image_list`` subset) pre-processed by RobustBench's ``preprocess``."""
    robustbench_transform(preprocess)  # a bad name fails before any folder is listed
    return JpegEvalLoader(list_samples(root, classes, image_list), preprocess, device, batch_size=batch_size,
                          num_workers=num_workers, channels_last=channels_last, rank=rank, world_size=world_size)


__all__ = ["PREPROCESSINGS", "robustbench_transform", "list_samples", "JpegDataset", "JpegEvalLoader",
           "make_jpeg_loader"]
