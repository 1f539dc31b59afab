"""FFCV datasets: ImageFolder round trip (labels exact, pixels within JPEG tolerance), corrupt files skipped and
counted, digits split, seeded order, loader output format, and clear errors for missing data."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atscale.config import DataCfg
from atscale.data import DatasetError, build_digits, build_imagefolder, make_loader, read_meta
from atscale.data.loaders import DeviceLoader
from atscale.data.write import ensure_dataset


def _smooth_image(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A smooth colour pattern (JPEG-friendly, unlike white noise)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(0.5, 3, 3)
    img = np.stack([np.sin(a * np.pi * xx + c), np.cos(b * np.pi * yy), np.sin(np.pi * (xx + yy) * a / 2)], -1)
    return ((img * 0.5 + 0.5) * 255).astype(np.uint8)


def _make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    truth: dict = {"train": [], "val": []}
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = _smooth_image(rng)
                Image.fromarray(img).save(d / f"{c}_{i}.JPEG", quality=95)
                truth[split].append((img, ci))
    return truth


def _read_all(root: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = DataCfg(root=str(root), eval_batch_size=7, val_size=size, val_crop_ratio=1.0)
    xs, ys = zip(*make_loader(root, split, cfg, torch.device("cpu"), 0, train=False))
    return torch.cat(xs), torch.cat(ys)


def test_imagefolder_round_trip_keeps_labels_and_images(tmp_path: Path) -> None:
    truth = _make_imagefolder(tmp_path / "src")
    meta = build_imagefolder(tmp_path / "src", tmp_path / "ffcv", jpeg_quality=95)
    assert meta["classes"] == ["cat", "dog", "eel"] and meta["n_train"] == 12 and meta["n_val"] == 12
    assert meta["skipped"]["count"] == 0
    for split in ("train", "val"):
        x, y = _read_all(tmp_path / "ffcv", split, 48)
        assert y.tolist() == [label for _, label in truth[split]]
        ref = torch.from_numpy(np.stack([img for img, _ in truth[split]])).permute(0, 3, 1, 2).float() / 255
        err = (x - ref).abs()
        assert err.mean().item() < 0.02 and err.max().item() < 0.25  # two JPEG encodes at quality 95
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


def test_corrupt_and_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path / "src", per_class=3)
    good = (tmp_path / "src" / "train" / "cat" / "cat_0.JPEG").read_bytes()
    (tmp_path / "src" / "train" / "dog" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (tmp_path / "src" / "train" / "eel" / "notes.JPEG").write_text("this is not an image")
    (tmp_path / "src" / "val" / "cat" / "empty.jpg").write_bytes(b"")
    meta = build_imagefolder(tmp_path / "src", tmp_path / "ffcv")
    assert meta["skipped"]["count"] == 3
    names = sorted(Path(s["file"]).name for s in meta["skipped"]["files"])
    assert names == ["empty.jpg", "notes.JPEG", "truncated.JPEG"]
    assert all(s["error"] for s in meta["skipped"]["files"])
    assert meta["n_train"] == 9 and meta["n_val"] == 9
    assert read_meta(tmp_path / "ffcv")["skipped"]["count"] == 3
    x, y = _read_all(tmp_path / "ffcv", "train", 48)
    assert len(y) == 9


def test_digits_dataset_split_is_seeded_stratified_and_complete(tmp_path: Path, digits_root: Path) -> None:
    meta = read_meta(digits_root)
    assert meta["num_classes"] == 10 and meta["n_train"] + meta["n_val"] == 1797
    assert 0.18 < meta["n_val"] / 1797 < 0.22
    again = build_digits(tmp_path / "d2", size=32, val_fraction=0.2, seed=0)
    assert again["n_val"] == meta["n_val"]
    x, y = _read_all(digits_root, "val", 32)
    x2, y2 = _read_all(tmp_path / "d2", "val", 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed, same split and pixels (raw, lossless)
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40


def test_train_loader_order_is_seeded_per_epoch_and_decodes_uint8_to_unit_range(digits_root: Path) -> None:
    cfg = DataCfg(root=str(digits_root), batch_size=100, image_size=32, train_crop="center", val_crop_ratio=1.0,
                  flip=True)

    def labels(seed: int, epoch: int) -> list[int]:
        loader = make_loader(digits_root, "train", cfg, torch.device("cpu"), seed, train=True)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(0, 0) == labels(0, 0)
    assert labels(0, 0) != labels(0, 1)
    assert labels(0, 0) != labels(1, 0)
    loader = make_loader(digits_root, "train", cfg, torch.device("cpu"), 0, train=True)
    x, _ = next(iter(loader))
    assert x.shape == (100, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-3)  # exactly uint8 levels / 255
    x2, _ = next(iter(loader))
    assert torch.equal(x, x2)  # flips come from a seeded generator


def test_random_crops_are_reproducible_per_seed_epoch_and_thread_count(digits_root: Path) -> None:
    """The random-resized crop is seeded per image (atscale.data.crop): the same (seed, epoch) gives the same pixels
    with 1 or 2 decode threads; another epoch or seed gives other crops; the crops do differ from the center crop."""
    cfg = DataCfg(root=str(digits_root), batch_size=64, image_size=32, rrc_scale=[0.3, 1.0], flip=False)

    def epoch(seed: int, e: int, workers: int = 2, crop: str = "random_resized") -> torch.Tensor:
        loader = make_loader(digits_root, "train", replace(cfg, num_workers=workers, train_crop=crop),
                             torch.device("cpu"), seed, train=True)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    first = epoch(0, 0)
    assert torch.equal(first, epoch(0, 0)) and torch.equal(first, epoch(0, 0, workers=1))
    center = epoch(0, 0, crop="center")  # the same images in the same order, uncropped
    assert (first != center).flatten(1).any(1).float().mean() > 0.9
    assert not torch.equal(first, epoch(0, 1)) and not torch.equal(first, epoch(1, 0))


def test_flips_mirror_a_seeded_half_and_held_batches_stay_valid(digits_root: Path) -> None:
    """Every yielded batch is its own tensor (FFCV reuses its buffers): holding a whole epoch keeps each batch intact;
    flipping mirrors about half of the images of each batch and leaves the others untouched."""
    cfg = DataCfg(root=str(digits_root), batch_size=50, image_size=32, train_crop="center", val_crop_ratio=1.0,
                  flip=False)
    plain = list(make_loader(digits_root, "train", cfg, torch.device("cpu"), 0, train=True))
    flipped = list(make_loader(digits_root, "train", replace(cfg, flip=True), torch.device("cpu"), 0, train=True))
    again = next(iter(make_loader(digits_root, "train", cfg, torch.device("cpu"), 0, train=True)))
    assert torch.equal(plain[0][0], again[0]) and len({x.data_ptr() for x, _ in plain}) == len(plain)
    fractions = []
    for (a, ya), (b, yb) in zip(plain, flipped):
        assert torch.equal(ya, yb) and b.is_contiguous(memory_format=torch.channels_last)
        same, mirrored = (b == a).flatten(1).all(1), (b == a.flip(3)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        fractions.append((mirrored & ~same).float().mean().item())
    assert 0.35 < sum(fractions) / len(fractions) < 0.65


class _Batches(list):
    """Stands in for FFCV's Loader in front of ``DeviceLoader``: uint8 NHWC memory seen as NCHW, as FFCV's
    ``ToTorchImage(channels_last=True)`` gives a GPU run after ``ToDevice``."""

    next_epoch = 0


def test_uint8_batches_convert_to_unit_float_and_flip() -> None:
    """The GPU branch of DeviceLoader (uint8 transfer, conversion on the device), exercised on CPU tensors."""
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (6, 8, 8, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2) for _ in range(3)]
    labels = [torch.arange(6, dtype=torch.int32) for _ in raw]
    loader = DeviceLoader(_Batches(zip(raw, labels)), torch.device("cpu"), flip=True, seed=0)
    out = list(loader)
    mirrored = 0
    for (x, y), img in zip(out, raw):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.long
        ref = img.float() / 255
        same, flipped = (x == ref).flatten(1).all(1), (x == ref.flip(3)).flatten(1).all(1)
        assert bool((same | flipped).all())
        mirrored += int((flipped & ~same).sum())
        img.zero_()  # the source buffer is reused: the yielded batch must not change
        assert x.max() > 0
    assert 0 < mirrored < 18


def test_missing_dataset_error_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="atscale data digits"):
        read_meta(tmp_path / "nothing")
    cfg = DataCfg(source="imagefolder", root=str(tmp_path / "x"), src="")
    with pytest.raises(DatasetError, match="data.src"):
        ensure_dataset(cfg)
    with pytest.raises(DatasetError, match="ImageNet layout"):
        build_imagefolder(tmp_path / "missing", tmp_path / "out")
    from atscale.data import build_cifar10

    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        build_cifar10(tmp_path, tmp_path / "out")


def test_cli_data_digits_prints_summary(tmp_path: Path, capfd) -> None:
    from atscale.cli import main

    assert main(["data", "digits", "--out", str(tmp_path / "d"), "--size", "16"]) == 0
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert summary == {"source": "digits", "num_classes": 10, "n_train": 1438, "n_val": 359, "skipped": 0}
    assert read_meta(tmp_path / "d")["image_size"] == 16
