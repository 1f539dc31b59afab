"""Distribution-shift evaluation over ImageFolder test sets, read through FFCV (AdvProp, Xie thesis Sec 7.5.3).

Layouts (class folders are matched to the model's training classes by name, from the checkpoint's ``meta["classes"]``):

- ``folder`` / ``stylized``: ``<root>/<class>/<image>``, classes a subset of the training classes (Stylized-ImageNet has
  all of them); plain top-1 accuracy over all logits.
- ``imagenet-a``: the same layout with a subset of the classes (ImageNet-A / ImageNet-R: 200 wnids); the logits are
  restricted to the present classes' columns before the argmax (Hendrycks et al. 2021). The mapping comes from the
  folder names, not from a hard-coded wnid list.
- ``imagenet-c``: ``<root>/<corruption>/<severity 1..5>/<class>/<image>`` (Hendrycks & Dietterich 2019). Per corruption
  and severity the top-1 error E_s,c; with a baseline table, CE_c = sum_s E_s,c / sum_s E^base_s,c and
  mCE = mean_c CE_c; with clean errors for both, relative CE_c = sum_s (E_s,c - E_clean) / sum_s (E^base_s,c -
  E^base_clean).

Each folder tree becomes one ``.beton`` (FFCV's writer, through :func:`atscale.data.write.write_beton`), cached in
``cache_dir`` under a key of the file list, sizes and mtimes, so a changed tree is rewritten and an unchanged one is
reused. Loading is the val pipeline (center crop, strided shard per rank, counts all-reduced: every image once).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from atscale import distributed as dist
from atscale.data.sources import IMG_EXTENSIONS, DatasetError, FileSplit, scan_image_files
from atscale.evaluation.evaluator import first_images, rank_share
from atscale.runtime import autocast
from atscale.layers.context import evaluation

LAYOUTS = ("folder", "stylized", "imagenet-a", "imagenet-c")

# Hendrycks & Dietterich (2019), ImageNet-C: AlexNet top-1 error per corruption, mean over the five severities (the
# normalizer of the published mCE); clean: torchvision AlexNet top-1 error (1 - 0.56522).
ALEXNET_BASELINE = {
    "name": "alexnet", "clean": 0.43478,
    "corruptions": {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
                    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
                    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
                    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840,
                    "jpeg_compression": 0.606500}}


# ----------------------------------------------------------------------------------------------- folders


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_tree(root: str | Path, model_classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Files, labels (indices into ``model_classes``) and class names of ``<root>/<class>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"test set folder '{root}' does not exist; pass --shift-root pointing at <root>/<class>/"
                           f"<image> (class folders named as the training classes)")
    found = [p.name for p in _subdirs(root)]
    if not found:
        raise DatasetError(f"test set folder '{root}' has no class folders; expected {root}/<class>/<image> with the "
                           f"training classes' names (e.g. {', '.join(model_classes[:3])})")
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        hint = ""
        splits = [c for c in unknown if c in ("train", "val", "test")]
        if splits:
            hint = f" It looks like a split folder: try --shift-root {root / splits[-1]}."
        raise DatasetError(f"{len(unknown)} class folder(s) under '{root}' are not among the model's "
                           f"{len(model_classes)} training classes: {unknown[:5]}. Class folders must be named as the "
                           f"training classes (this checkpoint's start with {model_classes[:3]}).{hint}")
    files, labels = [], []
    for c in found:
        imgs = _images(root / c)
        files += [str(p) for p in imgs]
        labels += [index[c]] * len(imgs)
    if not files:
        raise DatasetError(f"test set folder '{root}' has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return files, labels, found


def corruption_tree(root: str | Path) -> dict[str, dict[str, Path]]:
    """``<root>/<corruption>/<severity>`` folders of an ImageNet-C layout: corruption -> {severity: folder}."""
    root = Path(root)
    layout = f"expected the ImageNet-C layout {root}/<corruption>/<severity 1..5>/<class>/<image>"
    if not root.is_dir():
        raise DatasetError(f"ImageNet-C folder '{root}' does not exist; {layout}")
    tree: dict[str, dict[str, Path]] = {}
    for c in _subdirs(root):
        sev = _subdirs(c)
        bad = [s.name for s in sev if not re.fullmatch(r"[1-9]\d*", s.name)]
        if bad or not sev:
            raise DatasetError(f"'{c}' is not a corruption folder: its subfolders should be severities 1..5, found "
                               f"{bad[:5] or 'none'}; {layout}")
        tree[c.name] = {s.name: s for s in sorted(sev, key=lambda s: int(s.name))}
    if not tree:
        raise DatasetError(f"ImageNet-C folder '{root}' has no corruption folders; {layout}")
    return tree


# ----------------------------------------------------------------------------------------------- .beton cache


def _tree_key(files: list[str], labels: list[int], settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for f, y in zip(files, labels):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\n".encode())
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-80:] or "set"


def build_beton(root: str | Path, model_classes: list[str], cache_dir: str | Path, *, name: str | None = None,
                write_mode: str = "jpg", jpeg_quality: int = 95, max_resolution: int = 0, workers: int = 2) -> dict:
    """``<root>/<class>/<image>`` -> ``<cache_dir>/<name>-<key>.beton`` (labels = training-class indices), reused when
    the tree is unchanged. Rank 0 writes; the other ranks wait. Undecodable images are skipped and listed."""
    from atscale.data.write import write_beton

    root, cache_dir = Path(root), Path(cache_dir)
    files, labels, found = scan_class_tree(root, model_classes)
    settings = {"write_mode": write_mode, "jpeg_quality": jpeg_quality, "max_resolution": max_resolution}
    stem = f"{_slug(name or root.name)}-{_tree_key(files, labels, settings)}"
    beton, side = cache_dir / f"{stem}.beton", cache_dir / f"{stem}.json"
    if dist.rank() == 0 and not (beton.is_file() and side.is_file()):
        errors = scan_image_files(files, workers, desc=f"checking {root}")
        good = [(f, y) for f, y, e in zip(files, labels, errors) if e is None]
        bad = [{"file": f, "error": e} for f, e in zip(files, errors) if e is not None]
        if not good:
            raise DatasetError(f"every image under '{root}' failed to decode; first: {bad[0]['file']}: "
                               f"{bad[0]['error']}. Replace the corrupt files or point --shift-root elsewhere")
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_beton(FileSplit([f for f, _ in good], [y for _, y in good]), beton, write_mode=write_mode,
                    max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=workers)
        side.write_text(json.dumps({"root": str(root), "classes": found, "n": len(good),
                                    "skipped": {"count": len(bad), "files": bad[:100]}, **settings}, indent=2))
    dist.barrier()
    info = json.loads(side.read_text())
    if info["skipped"]["count"]:
        warnings.warn(f"{info['skipped']['count']} undecodable image(s) under '{root}' were skipped (first: "
                      f"{info['skipped']['files'][0]['file']})", stacklevel=2)
    return {"beton": beton, "classes": found, "n": info["n"], "skipped": info["skipped"]["count"]}


# ----------------------------------------------------------------------------------------------- accuracy


@torch.no_grad()
def beton_accuracy(model: nn.Module, beton: str | Path, data_cfg, device: torch.device, *,
                   columns: list[int] | None = None, amp_dtype: torch.dtype | None = None, max_images: int = 0,
                   seed: int = 0, channels_last: bool = True, progress: bool = True, desc: str = "shift") -> dict:
    """Top-1 correct / n over one .beton (val pipeline, strided shard per rank, counts summed over ranks).

    ``columns``: class indices to restrict the logits to before the argmax (ImageNet-A style subsets)."""
    from atscale.data import make_loader

    beton = Path(beton)
    rank, world = dist.rank(), dist.world_size()
    loader = make_loader(beton.parent, beton.stem, data_cfg, device, seed, train=False, channels_last=channels_last,
                         rank=rank, world_size=world)
    limit = rank_share(max_images)
    cols = torch.tensor(columns, device=device) if columns is not None else None
    was = model.training
    model.eval()
    n = correct = 0
    bar = tqdm(total=len(loader.loader.indices) if limit is None else min(limit, len(loader.loader.indices)),
               desc=desc, unit="img", disable=not (progress and rank == 0), leave=False, mininterval=1.0)
    with evaluation():
        for x, y in first_images(loader, limit):
            with autocast(device, amp_dtype):
                logits = model(x)
            pred = logits.argmax(1) if cols is None else cols[logits.index_select(1, cols).argmax(1)]
            correct += int((pred == y).sum())
            n += y.shape[0]
            bar.update(y.shape[0])
    bar.close()
    model.train(was)
    n, correct = (int(v) for v in dist.all_reduce_sum(torch.tensor([n, correct], dtype=torch.float64,
                                                                   device=device)).tolist())
    return {"n": n, "correct": correct, "acc": correct / max(1, n), "error": 1 - correct / max(1, n)}


# ----------------------------------------------------------------------------------------------- mCE


def _as_fraction(values: list[float]) -> float:
    return 100.0 if any(v > 1.0 for v in values) else 1.0


def load_baseline(spec: str | Path | dict | None) -> dict | None:
    """A baseline error table: ``"alexnet"`` (built in), a YAML/JSON file or a dict of the form
    ``{"name": ..., "clean": E_clean, "corruptions": {corruption: [E_1..E_5] or mean error}}`` (or the corruptions
    mapping alone). Errors as fractions or percent (any value > 1 means percent)."""
    if spec is None:
        return None
    name = str(spec)
    if isinstance(spec, dict):
        raw, name = spec, spec.get("name", "custom")
    elif str(spec).lower() == "alexnet":
        raw = ALEXNET_BASELINE
    else:
        path = Path(spec)
        if not path.is_file():
            raise DatasetError(f"mCE baseline file '{path}' does not exist; give a YAML/JSON table "
                               "{corruption: [E_1..E_5]} (or 'alexnet' for the published AlexNet normalizer)")
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DatasetError(f"mCE baseline file '{path}' is not valid YAML/JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"mCE baseline {name!r} must be a mapping {{corruption: [E_1..E_5] or mean error}}")
    corr = raw.get("corruptions", {k: v for k, v in raw.items() if k not in ("name", "clean")})
    flat = [float(x) for v in corr.values() for x in (v if isinstance(v, list) else [v])]
    if raw.get("clean") is not None:
        flat.append(float(raw["clean"]))
    if not corr or any(not 0 <= v <= 100 for v in flat):
        raise DatasetError(f"mCE baseline {name!r}: expected errors in [0, 1] or percent per corruption, got {corr}")
    scale = _as_fraction(flat)
    table = {}
    for c, v in corr.items():
        if isinstance(v, list):
            sev = {str(i + 1): float(e) / scale for i, e in enumerate(v)}
            table[c] = {"severities": sev, "mean": sum(sev.values()) / len(sev)}
        else:
            table[c] = {"severities": None, "mean": float(v) / scale}
    clean = float(raw["clean"]) / scale if raw.get("clean") is not None else None
    return {"name": raw.get("name", name), "clean": clean, "corruptions": table}


def corruption_errors(errors: dict[str, dict[str, float]], baseline: dict | None,
                      clean_error: float | None = None) -> dict:
    """CE_c, mCE and (with clean errors for model and baseline) relative CE_c and relative mCE, as fractions."""
    out: dict[str, Any] = {"ce": None, "mce": None, "relative_ce": None, "relative_mce": None, "notes": []}
    if baseline is None:
        return out
    ce, rce = {}, {}
    bc = baseline.get("clean")
    for c, e in errors.items():
        b = baseline["corruptions"].get(c)
        if b is None:
            continue
        sev = sorted(e, key=int)
        if b["severities"] is not None and all(s in b["severities"] for s in sev):
            base = [b["severities"][s] for s in sev]
        else:
            if len(sev) != 5:
                out["notes"].append(f"{c}: the baseline gives one mean over 5 severities but the data has "
                                    f"{len(sev)} ({', '.join(sev)}); CE compares unequal severity sets")
            base = [b["mean"]] * len(sev)
        mine = [e[s] for s in sev]
        ce[c] = sum(mine) / sum(base)
        if clean_error is not None and bc is not None and sum(x - bc for x in base) > 0:
            rce[c] = sum(x - clean_error for x in mine) / sum(x - bc for x in base)
    missing = sorted(set(errors) - set(ce))
    if missing:
        out["notes"].append(f"no baseline for {missing}: left out of mCE")
    if ce:
        out["ce"], out["mce"] = ce, sum(ce.values()) / len(ce)
    if rce:
        out["relative_ce"], out["relative_mce"] = rce, sum(rce.values()) / len(rce)
    return out


# ----------------------------------------------------------------------------------------------- entry point


def evaluate_shift(model: nn.Module, root: str | Path, layout: str, *, classes: list[str], data_cfg,
                   device: torch.device, cache_dir: str | Path, baseline: str | Path | dict | None = None,
                   clean_error: float | None = None, amp_dtype: torch.dtype | None = None, max_images: int = 0,
                   crop_ratio: float | None = None, write_mode: str = "jpg", jpeg_quality: int = 95,
                   channels_last: bool = True, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy of ``model`` on one shifted test set in ``layout`` (see the module docstring).

    ``data_cfg``: the run's DataCfg (val_size, val_crop_ratio, eval_batch_size, num_workers). ``crop_ratio``
    overrides the center-crop ratio (default: 1.0 for ImageNet-C, whose images are already 224x224 center crops, else
    the run's). ``clean_error``: the model's clean val error, for relative mCE. ``max_images``: per .beton."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown shift layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if not classes:
        raise DatasetError("the checkpoint's meta has no 'classes': class folders cannot be matched to the model")
    root = Path(root)
    if crop_ratio is None:
        crop_ratio = 1.0 if layout == "imagenet-c" else data_cfg.val_crop_ratio
    dcfg = replace(data_cfg, val_crop_ratio=crop_ratio)
    common = dict(amp_dtype=amp_dtype, max_images=max_images, seed=seed, channels_last=channels_last,
                  progress=progress)
    write = dict(write_mode=write_mode, jpeg_quality=jpeg_quality, workers=data_cfg.num_workers)
    cache_dir = Path(cache_dir)
    base = {"layout": layout, "root": str(root), "crop_ratio": crop_ratio}
    if layout != "imagenet-c":
        b = build_beton(root, classes, cache_dir, name=root.name, **write)
        cols = sorted(classes.index(c) for c in b["classes"]) if layout == "imagenet-a" else None
        r = beton_accuracy(model, b["beton"], dcfg, device, columns=cols, desc=f"{layout} {root.name}", **common)
        out = {**base, **r, "n_classes": len(b["classes"]), "skipped": b["skipped"],
               "restricted_to_present_classes": cols is not None}
        if layout in ("folder", "stylized") and len(b["classes"]) < len(classes):
            out["notes"] = [f"{len(b['classes'])} of the model's {len(classes)} classes present; logits over all"]
        return out

    tree = corruption_tree(root)
    errors: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    n = correct = skipped = 0
    present: set[str] = set()
    for c, sevs in tree.items():
        for s, folder in sevs.items():
            b = build_beton(folder, classes, cache_dir, name=f"{root.name}-{c}-{s}", **write)
            r = beton_accuracy(model, b["beton"], dcfg, device, desc=f"{c} s{s}", **common)
            errors.setdefault(c, {})[s] = r["error"]
            counts.setdefault(c, {})[s] = r["n"]
            n, correct, skipped = n + r["n"], correct + r["correct"], skipped + b["skipped"]
            present |= set(b["classes"])
    bl = load_baseline(baseline)
    mce = corruption_errors(errors, bl, clean_error)
    notes = mce.pop("notes")
    sev_sets = {tuple(e) for e in errors.values()}
    if len(sev_sets) > 1:
        notes.append("corruptions have different severity sets: " + "; ".join(
            f"{c}: {','.join(e)}" for c, e in errors.items()))
    return {**base, "n": n, "correct": correct, "acc": correct / max(1, n), "error": 1 - correct / max(1, n),
            "n_classes": len(present), "skipped": skipped, "errors": errors, "counts": counts,
            "corruption_error": {c: sum(e.values()) / len(e) for c, e in errors.items()},
            "mean_error": sum(v for e in errors.values() for v in e.values()) / sum(len(e) for e in errors.values()),
            "baseline": bl["name"] if bl else None, "clean_error": clean_error, **mce, "notes": notes}


__all__ = ["LAYOUTS", "ALEXNET_BASELINE", "scan_class_tree", "corruption_tree", "build_beton", "beton_accuracy",
           "load_baseline", "corruption_errors", "evaluate_shift"]
