"""Write FFCV ``.beton`` files (train/val) plus ``meta.json`` from a source; the layout every loader reads.

A build checks everything it can before the long work: the source layout of both splits and that the output folder
can be written. It writes into a hidden staging folder inside the output folder and moves ``train.beton``,
``val.beton`` and ``meta.json`` into place only when the whole build succeeded, so a failed or interrupted build never
leaves a dataset that looks finished (and keeps a previous one intact). Unreadable or corrupt images are skipped,
counted and listed in ``meta.json``.

Each ``.beton`` goes through :func:`atscale.data.beton.write_beton` (supervised FFCV writer, pages sized to the data).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from atscale.data.beton import page_size_for, write_beton
from atscale.data.sources import (ArraySplit, DatasetError, FileSplit, cifar10_splits, digits_splits,
                                  imagefolder_split, require_images_per_class, scan_images)
from atscale.fsio import atomic_write_bytes

META = "meta.json"
OUTPUTS = ("train.beton", "val.beton", META)
def read_meta(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    meta = root / META
    if not meta.is_file() or not (root / "train.beton").is_file() or not (root / "val.beton").is_file():
        raise DatasetError(
            f"no FFCV dataset at '{root}' (needs train.beton, val.beton, {META}). Build one with "
            f"`atscale data digits --out {root}`, `atscale data imagefolder --src <imagenet> --out {root}` or "
            f"`atscale data cifar10 --src <cifar> --out {root}`, or set data.build_if_missing=true with data.source")
    return json.loads(meta.read_text())


def _prepare_out(out: Path) -> list[Path]:
    """Check that ``out`` is (or can become) a writable folder whose outputs can be replaced, creating it; returns the
    folders this created, deepest first. Raises DatasetError naming the problem."""
    missing, existing = [], out
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"lies under the file '{existing}'"
        raise DatasetError(f"output folder '{out}' {where}, not a folder",
                           "pass a folder path as --out (data.root in a config)")
    blocked = [n for n in OUTPUTS if (out / n).exists() and not (out / n).is_file()]
    if blocked:
        raise DatasetError(f"'{out / blocked[0]}' exists and is not a file, so the build could not replace it",
                           "remove it or pass another --out (data.root)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _remove_empty(missing)
        raise DatasetError(f"cannot write to output folder '{out}' ({e.strerror or e})",
                           "pass a writable folder as --out (data.root in a config)") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def _staged_build(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out`` (checked writable first) for a build's files; removed afterwards, along with
    any folder this created when the build fails. :func:`_publish` moves the finished files into ``out``."""
    created = _prepare_out(out)
    stage = Path(tempfile.mkdtemp(prefix=".atscale-build-", dir=out))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Move the staged splits into ``out`` and write meta.json last: an older meta.json is removed first, so a build
    stopped between the moves leaves no dataset that looks finished."""
    (out / META).unlink(missing_ok=True)
    for name in ("train.beton", "val.beton"):
        os.replace(stage / name, out / name)
    atomic_write_bytes(out / META, json.dumps(meta, indent=2).encode())
    return meta


def build_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0, workers: int = 2,
                 classes: Sequence[int] = ()) -> dict:
    """scikit-learn digits (all ten, or the ``classes`` subset relabelled in order) -> raw-pixel .beton files
    (lossless: the images are tiny)."""
    out = Path(out)
    with _staged_build(out) as stage:
        train, val, classes = digits_splits(size, val_fraction, seed, classes)
        for name, split in (("train", train), ("val", val)):
            write_beton(split, stage / f"{name}.beton", write_mode="raw", workers=workers)
        return _publish(stage, out, {"source": "digits", "classes": classes, "num_classes": len(classes),
                                     "n_train": len(train), "n_val": len(val), "image_size": size,
                                     "skipped": {"count": 0, "files": []}})


def build_cifar10(src: str | Path, out: str | Path, workers: int = 2) -> dict:
    """CIFAR-10 (torchvision format) -> raw-pixel .beton files."""
    out = Path(out)
    with _staged_build(out) as stage:
        train, val, classes = cifar10_splits(src)
        for name, split in (("train", train), ("val", val)):
            write_beton(split, stage / f"{name}.beton", write_mode="raw", workers=workers)
        return _publish(stage, out, {"source": "cifar10", "classes": classes, "num_classes": len(classes),
                                     "n_train": len(train), "n_val": len(val), "image_size": 32,
                                     "skipped": {"count": 0, "files": []}})


def _decodable(split_dir: Path, files: list[str], labels: list[int], classes: list[str], workers: int,
               train: bool) -> tuple[FileSplit, list[dict[str, str]]]:
    """Decode every file of one split: the images that decode (with their sizes) and the skipped ones. Refuses a
    split where nothing decodes, and a training class where nothing decodes."""
    errors, sizes = scan_images(files, workers, desc=f"checking {split_dir.name} images")
    keep = [i for i, e in enumerate(errors) if e is None]
    bad = [{"file": f, "error": e} for f, e in zip(files, errors) if e is not None]
    if not keep:
        raise DatasetError(f"every image under '{split_dir}' failed to decode (first: {bad[0]['file']}: "
                           f"{bad[0]['error']})", "replace the corrupt files or point --src elsewhere")
    if train:
        require_images_per_class(split_dir, [labels[i] for i in keep], classes, "hold no image that decodes")
    split = FileSplit([files[i] for i in keep], [labels[i] for i in keep], [sizes[i] for i in keep])
    return split, bad


def build_imagefolder(src: str | Path, out: str | Path, max_resolution: int = 0, jpeg_quality: int = 90,
                      workers: int = 2, write_mode: str = "jpg") -> dict:
    """ImageNet layout (``<src>/train/<class>/*``, ``<src>/val/<class>/*``) -> JPEG .beton files, corrupt files skipped.

    Both splits' layout and the output folder are checked before any image is read; val (the smaller) is decoded
    first; nothing is written into ``out`` unless the whole build succeeds."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"ImageFolder source '{src}' does not exist; pass --src pointing at a folder with train/ "
                           "and val/ in ImageNet layout")
    train_files, train_labels, classes = imagefolder_split(src / "train")
    listed = {"train": (train_files, train_labels), "val": imagefolder_split(src / "val", classes)[:2]}
    meta: dict[str, Any] = {"source": "imagefolder", "src": str(src), "max_resolution": max_resolution,
                            "jpeg_quality": jpeg_quality, "skipped": {"count": 0, "files": []}}
    with _staged_build(out) as stage:
        checked = {name: _decodable(src / name, *listed[name], classes, workers, name == "train")
                   for name in ("val", "train")}
        for name in ("train", "val"):
            split, bad = checked[name]
            meta["skipped"]["count"] += len(bad)
            meta["skipped"]["files"].extend(bad)
            write_beton(split, stage / f"{name}.beton", write_mode=write_mode, max_resolution=max_resolution,
                        jpeg_quality=jpeg_quality, workers=workers)
            meta[f"n_{name}"] = len(split)
        meta.update(classes=classes, num_classes=len(classes))
        return _publish(stage, out, meta)


def _same_digits(meta: dict[str, Any], data_cfg: Any) -> dict[str, Any]:
    """``meta``, unless a digits dataset there holds other digits than ``data.digits_classes`` asks for."""
    want = [str(c) for c in (data_cfg.digits_classes or range(10))]
    if data_cfg.source == "digits" and meta.get("source") == "digits" and meta.get("classes") != want:
        raise DatasetError(f"the digits dataset at '{data_cfg.root}' holds the digits {meta.get('classes')}, but "
                           f"data.digits_classes asks for {want}", "point data.root at another folder for this subset")
    return meta


def ensure_dataset(data_cfg: Any, seed: int = 0) -> dict[str, Any]:
    """Return meta.json of ``data.root``, building it first from ``data.source`` if missing and allowed."""
    root = Path(data_cfg.root)
    try:
        meta = read_meta(root)
    except DatasetError:
        if not data_cfg.build_if_missing:
            raise
    else:
        return _same_digits(meta, data_cfg)
    if data_cfg.source == "digits":
        return build_digits(root, data_cfg.digits_size, data_cfg.digits_val_fraction, seed, data_cfg.num_workers,
                            data_cfg.digits_classes)
    if not data_cfg.src:
        raise DatasetError(f"no FFCV dataset at '{root}' and data.src is empty: set data.src to the raw "
                           f"{data_cfg.source} folder to build it, or build it with `atscale data {data_cfg.source}`")
    if data_cfg.source == "cifar10":
        return build_cifar10(data_cfg.src, root, data_cfg.num_workers)
    return build_imagefolder(data_cfg.src, root, data_cfg.max_resolution, data_cfg.jpeg_quality, data_cfg.num_workers)


__all__ = ["ArraySplit", "build_digits", "build_cifar10", "build_imagefolder", "ensure_dataset", "page_size_for",
           "read_meta", "write_beton"]
