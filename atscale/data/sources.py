"""Raw image sources that become FFCV datasets: an ImageFolder tree, scikit-learn's bundled digits, CIFAR-10."""
from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from atscale.errors import DatasetError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ArraySplit:
    """An in-memory split: uint8 HWC RGB images and integer labels, indexable as (image, label) for FFCV's writer."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class FileSplit:
    """Image files with labels, decoded to RGB on access (files were checked to decode before writing). ``sizes``:
    each file's (width, height) when known (from :func:`scan_images`); the writer sizes its pages from them."""

    files: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[i]) as im:
            return im.convert("RGB"), self.labels[i]


def digits_splits(size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                  keep: Sequence[int] = ()) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """scikit-learn's 1,797 8x8 handwritten digits, upsampled (bicubic) to size x size RGB, with a seeded stratified
    split. ``keep``: only these digits, relabelled 0..len(keep)-1 in that order (a new task for fine-tuning twins)."""
    from sklearn.datasets import load_digits

    if any(c not in range(10) for c in keep) or len(set(keep)) != len(keep) or len(keep) == 1:
        raise DatasetError(f"data.digits_classes = {list(keep)} is not a subset of the digits 0..9 (two or more, each "
                           "once)", "list two or more distinct digits, e.g. [5, 6, 7, 8, 9], or [] for all ten")
    d = load_digits()
    gray = np.clip(d.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    digits = list(keep) or list(range(10))
    chosen = np.isin(labels, digits)
    gray, labels = gray[chosen], np.array([digits.index(int(v)) for v in labels[chosen]], np.int64)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)) for g in gray])
    rgb = np.repeat(up[..., None], 3, axis=-1)
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: int(round(len(idx) * val_fraction))])
    val_mask = np.zeros(len(labels), bool)
    val_mask[val_idx] = True
    classes = [str(c) for c in digits]
    return ArraySplit(rgb[~val_mask], labels[~val_mask]), ArraySplit(rgb[val_mask], labels[val_mask]), classes


def cifar10_splits(root: str | Path) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """CIFAR-10 in torchvision's on-disk format (``<root>/cifar-10-batches-py``); never downloads."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    if not (root / "cifar-10-batches-py").is_dir():
        raise DatasetError(
            f"CIFAR-10 not found: expected '{root / 'cifar-10-batches-py'}' (torchvision's format). Download it once "
            f"with torchvision.datasets.CIFAR10('{root}', download=True) on a machine with internet, then copy it here")
    tr, va = CIFAR10(str(root), train=True, download=False), CIFAR10(str(root), train=False, download=False)
    return (ArraySplit(tr.data, np.asarray(tr.targets)), ArraySplit(va.data, np.asarray(va.targets)), list(tr.classes))


def _check_image(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """Fully decode one file; (None, (width, height)) if it reads as an RGB image, else (error string, None)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            rgb.load()
            return None, rgb.size
    except Exception as e:  # noqa: BLE001 - every decode failure means "skip this file"
        return f"{type(e).__name__}: {e}", None


def scan_images(files: Sequence[str], workers: int = 2, desc: str = "checking images"
                ) -> tuple[list[str | None], list[tuple[int, int] | None]]:
    """Decode every file in parallel (progress bar); per file, in order: an error string or None, and its
    (width, height) or None."""
    bar = {"total": len(files), "desc": desc, "unit": "img", "mininterval": 2}
    if workers <= 1 or len(files) < 64:
        results = [_check_image(f) for f in tqdm(files, **bar)]
    else:
        with get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_check_image, files, chunksize=64), **bar))
    return [e for e, _ in results], [s for _, s in results]


def scan_image_files(files: Sequence[str], workers: int = 2, desc: str = "checking images") -> list[str | None]:
    """Decode every file in parallel (progress bar); one error string or None per file, in order."""
    return scan_images(files, workers, desc)[0]


def _class_images(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]


def require_images_per_class(split_dir: Path, labels: Sequence[int], classes: Sequence[str], lacking: str) -> None:
    """Refuse a training split where some class has no image: it would still take a label, shifting every later one.
    ``lacking`` says what those folders lack ("hold no images", ...)."""
    empty = sorted(set(range(len(classes))) - set(labels))
    if empty:
        shown = ", ".join(f"'{split_dir / classes[i]}'" for i in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise DatasetError(f"class folder(s) {shown}{more} {lacking}, so every later class label would shift",
                           "remove the folder(s) or add images that decode to them")


def imagefolder_split(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of ``<split_dir>/<class>/*``; classes are sorted folder names (taken from train for val).

    Train (``classes`` None) defines the labels, so each of its class folders must hold an image: an empty one would
    become a class without images and shift every later label. A val class folder may be empty."""
    if not split_dir.is_dir():
        raise DatasetError(f"ImageFolder split '{split_dir}' does not exist; expected <src>/train/<class>/*.JPEG and "
                           f"<src>/val/<class>/*.JPEG (ImageNet layout)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise DatasetError(f"ImageFolder split '{split_dir}' has no class folders; expected {split_dir}/<class>/*.JPEG")
    train = classes is None
    if train:
        classes = found
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))[:5]
        raise DatasetError(f"'{split_dir}' has classes that train/ lacks ({extra}...); both splits need the same classes")
    index = {c: i for i, c in enumerate(classes)}
    per_class = {c: _class_images(split_dir / c) for c in found}
    files = [f for c in found for f in per_class[c]]
    labels = [index[c] for c in found for _ in per_class[c]]
    if train:
        require_images_per_class(split_dir, labels, classes, f"hold no images ({', '.join(IMG_EXTENSIONS)})")
    if not files:
        raise DatasetError(f"ImageFolder split '{split_dir}' has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return files, labels, classes
