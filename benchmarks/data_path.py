"""Data path: atscale's FFCV training pipeline vs torchvision ImageFolder + PIL + DataLoader on the same JPEG files.

Both decode the same JPEGs, random-resized-crop them to ``--size`` with a horizontal flip and deliver float [0, 1]
NCHW batches in the main process, with the same number of worker processes / threads (``--workers``) on the same
cores. The JPEGs are generated once (smooth random images of ImageNet-like size, quality 90) into an ImageNet-layout
tree; the FFCV side reads the .beton that ``atscale data imagefolder`` writes from that tree (JPEG mode, same quality).

    python benchmarks/data_path.py --images 2000 --workers 2 --save benchmarks/results/cpu-2core_data_path.json

prints JSON: images/s of each variant over ``--epochs`` timed epochs (after one warm-up epoch), images/s per worker,
and the ratios. ``ffcv`` / ``torchvision``: float [0, 1] batches in the main process (what a CPU run trains on);
``ffcv_uint8`` / ``torchvision_uint8``: uint8 batches (what a GPU run sends to the device, converting there);
``ffcv_main_process_float``: FFCV's uint8 batches converted and flipped in the main process, atscale's CPU path
before the conversion moved into FFCV's worker threads; ``ffcv_uint8_seeded_crop``: ``ffcv_uint8`` with atscale's
reproducible (per-image seeded) crop, against FFCV's unseeded one.
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


def ffcv_iter(root: Path, args):
    """atscale's training loader: float [0, 1] channels_last batches, seeded flips, each batch its own tensor."""
    from atscale.config import DataCfg
    from atscale.data import make_loader

    cfg = DataCfg(root=str(root), batch_size=args.batch, image_size=args.size, num_workers=args.workers, flip=True,
                  rrc_scale=[0.08, 1.0])
    loader = make_loader(root, "train", cfg, torch.device("cpu"), seed=0, train=True, channels_last=True)
    epoch = {"i": 0}

    def it():
        loader.set_epoch(epoch["i"])
        epoch["i"] += 1
        return iter(loader)

    return it


def ffcv_uint8_iter(root: Path, args, main_process_float: bool = False, seeded: bool = False):
    """FFCV decode + random-resized crop only: the uint8 NHWC batches a GPU run sends to the device. With
    ``main_process_float``: then the float conversion, channels_last copy and where-flip in the main process, as
    atscale's loader did on CPU before the conversion moved into FFCV's worker threads (the before of that change).
    ``seeded``: atscale's per-image seeded crop instead of FFCV's unseeded one (the cost of reproducible crops)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    from atscale.data.crop import SeededRandomResizedCrop

    size = (args.size, args.size)
    crop = SeededRandomResizedCrop(size, 0, scale=(0.08, 1.0)) if seeded else \
        RandomResizedCropRGBImageDecoder(size, scale=(0.08, 1.0))
    pipelines = {"image": [crop, ToTensor(), ToTorchImage(channels_last=True)],
                 "label": [IntDecoder(), ToTensor(), Squeeze()]}
    loader = Loader(str(root / "train.beton"), batch_size=args.batch, num_workers=args.workers,
                    order=OrderOption.RANDOM, drop_last=True, seed=0, pipelines=pipelines, os_cache=True)
    g = torch.Generator().manual_seed(0)

    def convert(batches):
        for img, label in batches:
            x = img.float().div_(255.0).contiguous(memory_format=torch.channels_last)
            m = (torch.rand(x.shape[0], generator=g) < 0.5).view(-1, 1, 1, 1)
            yield torch.where(m, x.flip(3), x), label

    return (lambda: convert(iter(loader))) if main_process_float else (lambda: iter(loader))


def torchvision_iter(tree: Path, args, uint8: bool = False):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(args.size, scale=(0.08, 1.0)),
                             transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor() if uint8 else transforms.ToTensor()])
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
           "setup": "same JPEG files (quality 90, 320-500 px a side); random-resized crop to size, flip; float [0,1] "
                    "NCHW batches (ffcv, torchvision) or uint8 batches as a GPU run transfers them (*_uint8); "
                    "workers = FFCV num_workers threads vs DataLoader worker processes; best of the timed epochs "
                    "after one warm-up epoch"}
    variants = {"ffcv": ffcv_iter(beton, args), "torchvision": torchvision_iter(tree, args),
                "ffcv_uint8": ffcv_uint8_iter(beton, args), "torchvision_uint8": torchvision_iter(tree, args, True),
                "ffcv_uint8_seeded_crop": ffcv_uint8_iter(beton, args, seeded=True),
                "ffcv_main_process_float": ffcv_uint8_iter(beton, args, main_process_float=True)}
    for name, make in variants.items():
        out[name] = time_loader(make, args.epochs)
        out[name]["img_per_s_per_worker"] = out[name]["img_per_s"] / max(1, args.workers)
        log(f"{name}: {out[name]['img_per_s']:.0f} img/s")
    out["ratio_ffcv_over_torchvision"] = out["ffcv"]["img_per_s"] / out["torchvision"]["img_per_s"]
    out["ratio_uint8_ffcv_over_torchvision"] = out["ffcv_uint8"]["img_per_s"] / out["torchvision_uint8"]["img_per_s"]
    out["ratio_seeded_crop_over_unseeded"] = out["ffcv_uint8_seeded_crop"]["img_per_s"] / out["ffcv_uint8"]["img_per_s"]
    out["ratio_worker_float_over_main_process_float"] = \
        out["ffcv"]["img_per_s"] / out["ffcv_main_process_float"]["img_per_s"]
    out["loadavg_end"] = os.getloadavg()
    return emit(out, args.save)


if __name__ == "__main__":
    main()
