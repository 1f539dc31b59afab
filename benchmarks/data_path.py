"""Data path: atscale's FFCV training pipeline vs torchvision ImageFolder + PIL + DataLoader on the same JPEG files.

Both decode the same JPEGs, random-resized-crop them to ``--size`` with a horizontal flip and deliver float [0, 1]
NCHW batches in the main process, with the same number of worker processes / threads (``--workers``) on the same
cores. The JPEGs are generated once (smooth random images of ImageNet-like size, quality 90) into an ImageNet-layout
tree; the FFCV side reads the .beton that ``atscale data imagefolder`` writes from that tree (JPEG mode, same quality).

    python benchmarks/data_path.py --images 2000 --workers 2 --save benchmarks/results/cpu-2core_data_path.json

prints JSON: images/s of each loader over ``--epochs`` timed epochs (after one warm-up epoch), images/s per worker,
and the ratio. ``ffcv_raw_uint8`` times FFCV's own uint8 batches without atscale's float conversion, channels_last copy
and flip, which on CPU run in the main process (on GPU they run on the device after the transfer).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import device_info, emit, log  # noqa: E402


def make_tree(root: Path, n: int, classes: int, seed: int) -> None:
    """``root/{train,val}/<class>/*.jpg``: smooth random colour images 320..500 px a side, JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            d = root / split / f"c{i % classes:03d}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(320, 501)), int(rng.integers(320, 501))
            small = (rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            noise = rng.integers(-12, 13, (h, w, 3))
            arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:06d}.jpg", quality=90)


def time_loader(make_iter, epochs: int) -> dict:
    n_warm = sum(x.shape[0] for x, _ in make_iter())  # warm-up epoch: page cache, JIT, worker start
    times, n = [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for x, _ in make_iter():
            assert x.ndim == 4
            n += x.shape[0]
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"images_per_epoch": n, "warmup_images": n_warm, "epoch_seconds": times, "img_per_s": n / best}


def ffcv_iter(root: Path, args, raw: bool = False):
    from atscale.config import DataCfg
    from atscale.data import make_loader

    cfg = DataCfg(root=str(root), batch_size=args.batch, image_size=args.size, num_workers=args.workers, flip=True,
                  rrc_scale=[0.08, 1.0])
    loader = make_loader(root, "train", cfg, torch.device("cpu"), seed=0, train=True, channels_last=True)
    epoch = {"i": 0}

    def it():
        loader.set_epoch(epoch["i"])
        epoch["i"] += 1
        if raw:  # FFCV's own uint8 batches, before atscale's float conversion / layout / flip in the main process
            return iter(loader.loader)
        return iter(loader)

    return it


def torchvision_iter(tree: Path, args):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(args.size, scale=(0.08, 1.0)),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    ds = datasets.ImageFolder(str(tree / "train"), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                     drop_last=True, persistent_workers=args.workers > 0, pin_memory=False)
    return lambda: iter(dl)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    p.add_argument("--work", default="", help="folder for the JPEG tree and .beton (default: a temporary one)")
    p.add_argument("--save", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from atscale.data.write import build_imagefolder

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data_path_"))
    tree, beton = work / "tree", work / "beton"
    if not (tree / "train").is_dir():
        log(f"writing {args.images} JPEGs under {tree}")
        make_tree(tree, args.images, args.classes, seed=0)
    if not (beton / "train.beton").exists():
        build_imagefolder(tree, beton, jpeg_quality=90, workers=args.workers)
    out = {"benchmark": "data_path", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "args": vars(args), "device": device_info(torch.device("cpu")), "loadavg_start": os.getloadavg(),
           "setup": "same JPEG files (quality 90, 320-500 px a side); random-resized crop to size, flip, float [0,1] "
                    "NCHW in the main process; workers = FFCV num_workers threads vs DataLoader worker processes; "
                    "best of the timed epochs after one warm-up epoch"}
    out["ffcv"] = time_loader(ffcv_iter(beton, args), args.epochs)
    log(f"ffcv: {out['ffcv']['img_per_s']:.0f} img/s")
    out["ffcv_raw_uint8"] = time_loader(ffcv_iter(beton, args, raw=True), args.epochs)
    log(f"ffcv raw uint8 batches: {out['ffcv_raw_uint8']['img_per_s']:.0f} img/s")
    out["torchvision"] = time_loader(torchvision_iter(tree, args), args.epochs)
    log(f"torchvision: {out['torchvision']['img_per_s']:.0f} img/s")
    for k in ("ffcv", "ffcv_raw_uint8", "torchvision"):
        out[k]["img_per_s_per_worker"] = out[k]["img_per_s"] / max(1, args.workers)
    out["ratio_ffcv_over_torchvision"] = out["ffcv"]["img_per_s"] / out["torchvision"]["img_per_s"]
    out["loadavg_end"] = os.getloadavg()
    return emit(out, args.save)


if __name__ == "__main__":
    main()
