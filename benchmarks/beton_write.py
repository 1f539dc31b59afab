""".beton writing: atscale's supervised writer (:func:`atscale.data.beton.write_beton`: pages sized to the data,
dead workers detected) against FFCV's own ``DatasetWriter.from_indexed_dataset`` on the same JPEG files, same JPEG
settings and the same number of worker processes.

The JPEGs are generated once (as in ``data_path.py``: smooth random images 320..500 px a side, quality 90). Each
variant writes the split ``--repeats`` times, alternating, and the best time of each is kept.

    python benchmarks/beton_write.py --images 1500 --workers 2 --save benchmarks/results/cpu-2core_beton_write.json

prints JSON: images/s of each writer, the ratio ours / ffcv, and the files' sizes (which must match closely: both
encode every image with FFCV's own field encoder).
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_path import make_tree  # noqa: E402
from train_step import device_info, emit, log  # noqa: E402


def ffcv_write(split, path: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()}
    DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(split, chunksize=64)


def ours_write(split, path: Path, workers: int) -> None:
    from atscale.data.beton import write_beton

    write_beton(split, path, write_mode="jpg", jpeg_quality=90, workers=workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--save")
    args = p.parse_args()
    from atscale.data.sources import FileSplit, imagefolder_split

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log(f"generating {args.images} JPEGs ...")
        make_tree(root / "src", args.images, 10, seed=0)
        files, labels, _ = imagefolder_split(root / "src" / "train")
        split = FileSplit(files, labels)
        best = {"ffcv": float("inf"), "ours": float("inf")}
        sizes = {}
        for r in range(args.repeats):
            for name, fn in (("ffcv", ffcv_write), ("ours", ours_write)):
                out = root / f"{name}.beton"
                t0 = time.perf_counter()
                fn(split, out, args.workers)
                best[name] = min(best[name], time.perf_counter() - t0)
                sizes[name] = out.stat().st_size
                out.unlink()
                log(f"repeat {r}: {name} {len(split) / best[name]:.1f} img/s")
    res = {k: {"seconds": round(v, 3), "img_per_s": round(len(split) / v, 1), "bytes": sizes[k]} for k, v in best.items()}
    emit({"benchmark": "beton_write", "date": dt.date.today().isoformat(), "device": device_info(torch.device("cpu")),
          "images": len(split), "workers": args.workers, "repeats": args.repeats, "results": res,
          "ratio_ours_over_ffcv": round(res["ours"]["img_per_s"] / res["ffcv"]["img_per_s"], 3)}, args.save)


if __name__ == "__main__":
    main()
