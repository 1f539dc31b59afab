"""Write FFCV ``.beton`` files (train/val) plus ``meta.json`` from a source; the layout every loader reads.

Each ``.beton`` is written to a temporary name and renamed when complete, so an interrupted build never leaves a file
that looks finished. Unreadable or corrupt images are skipped, counted and listed in ``meta.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from atscale.fsio import atomic_write_bytes
from atscale.data.sources import (ArraySplit, DatasetError, FileSplit, cifar10_splits, digits_splits,
                                  imagefolder_split, scan_image_files)

META = "meta.json"


def write_beton(split: Sequence, path: Path, write_mode: str = "jpg", max_resolution: int = 0, jpeg_quality: int = 90,
                workers: int = 2) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(split, chunksize=64)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_meta(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    meta = root / META
    if not meta.is_file() or not (root / "train.beton").is_file() or not (root / "val.beton").is_file():
        raise DatasetError(
            f"no FFCV dataset at '{root}' (needs train.beton, val.beton, {META}). Build one with "
            f"`atscale data digits --out {root}`, `atscale data imagefolder --src <imagenet> --out {root}` or "
            f"`atscale data cifar10 --src <cifar> --out {root}`, or set data.build_if_missing=true with data.source")
    return json.loads(meta.read_text())


def _finish(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    atomic_write_bytes(out / META, json.dumps(meta, indent=2).encode())
    return meta


def build_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0, workers: int = 2) -> dict:
    """scikit-learn digits -> raw-pixel .beton files (lossless: the images are tiny)."""
    out = Path(out)
    train, val, classes = digits_splits(size, val_fraction, seed)
    for name, split in (("train", train), ("val", val)):
        write_beton(split, out / f"{name}.beton", write_mode="raw", workers=workers)
    return _finish(out, {"source": "digits", "classes": classes, "num_classes": len(classes), "n_train": len(train),
                         "n_val": len(val), "image_size": size, "skipped": {"count": 0, "files": []}})


def build_cifar10(src: str | Path, out: str | Path, workers: int = 2) -> dict:
    """CIFAR-10 (torchvision format) -> raw-pixel .beton files."""
    out = Path(out)
    train, val, classes = cifar10_splits(src)
    for name, split in (("train", train), ("val", val)):
        write_beton(split, out / f"{name}.beton", write_mode="raw", workers=workers)
    return _finish(out, {"source": "cifar10", "classes": classes, "num_classes": len(classes), "n_train": len(train),
                         "n_val": len(val), "image_size": 32, "skipped": {"count": 0, "files": []}})


def build_imagefolder(src: str | Path, out: str | Path, max_resolution: int = 0, jpeg_quality: int = 90,
                      workers: int = 2, write_mode: str = "jpg") -> dict:
    """ImageNet layout (``<src>/train/<class>/*``, ``<src>/val/<class>/*``) -> JPEG .beton files, corrupt files skipped."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"ImageFolder source '{src}' does not exist; pass --src pointing at a folder with train/ "
                           "and val/ in ImageNet layout")
    meta: dict[str, Any] = {"source": "imagefolder", "src": str(src), "max_resolution": max_resolution,
                            "jpeg_quality": jpeg_quality, "skipped": {"count": 0, "files": []}}
    classes = None
    for name in ("train", "val"):
        files, labels, classes = imagefolder_split(src / name, classes)
        errors = scan_image_files(files, workers, desc=f"checking {name}")
        good = [(f, y) for f, y, e in zip(files, labels, errors) if e is None]
        bad = [{"file": f, "error": e} for f, e in zip(files, errors) if e is not None]
        meta["skipped"]["count"] += len(bad)
        meta["skipped"]["files"].extend(bad)
        if not good:
            raise DatasetError(f"every image under '{src / name}' failed to decode; first error: {bad[0]['error']}")
        split = FileSplit([f for f, _ in good], [y for _, y in good])
        write_beton(split, out / f"{name}.beton", write_mode=write_mode, max_resolution=max_resolution,
                    jpeg_quality=jpeg_quality, workers=workers)
        meta[f"n_{name}"] = len(split)
    meta.update(classes=classes, num_classes=len(classes))
    return _finish(out, meta)


def ensure_dataset(data_cfg: Any, seed: int = 0) -> dict[str, Any]:
    """Return meta.json of ``data.root``, building it first from ``data.source`` if missing and allowed."""
    root = Path(data_cfg.root)
    try:
        return read_meta(root)
    except DatasetError:
        if not data_cfg.build_if_missing:
            raise
    if data_cfg.source == "digits":
        return build_digits(root, data_cfg.digits_size, data_cfg.digits_val_fraction, seed, data_cfg.num_workers)
    if not data_cfg.src:
        raise DatasetError(f"no FFCV dataset at '{root}' and data.src is empty: set data.src to the raw "
                           f"{data_cfg.source} folder to build it, or build it with `atscale data {data_cfg.source}`")
    if data_cfg.source == "cifar10":
        return build_cifar10(data_cfg.src, root, data_cfg.num_workers)
    return build_imagefolder(data_cfg.src, root, data_cfg.max_resolution, data_cfg.jpeg_quality, data_cfg.num_workers)


__all__ = ["ArraySplit", "build_digits", "build_cifar10", "build_imagefolder", "ensure_dataset", "read_meta",
           "write_beton"]
