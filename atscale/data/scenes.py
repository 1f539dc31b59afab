"""The embedded scene dataset of the dense tasks (issue 15; Xie thesis Ch. 2 evaluates DAG on Pascal VOC): real
handwritten digits from scikit-learn pasted at random positions and scales onto textured backgrounds, with a per-pixel
class mask and one box per digit, so segmentation and detection models train and are attacked without any download.

Classes follow VOC's convention: 0 is the background, digit d is class d + 1 (11 classes). A digit's 8x8 image is
upsampled bilinearly to its size; its ink (intensity > 0.5 after scaling to [0, 1]) is the mask and the alpha of the
paste, in a colour drawn per digit. Digits never overlap (positions are re-drawn), so each box is the tight box of its
visible mask. Train and val scenes draw their digits from disjoint parts of scikit-learn's 1,797 images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 11  # background + ten digits
_INK = 0.5


@dataclass
class Scenes:
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8: 0 background, d + 1 for digit d
    boxes: list[np.ndarray]  # per image (K, 4) float32 x1, y1, x2, y2 in pixels (x2, y2 exclusive)
    labels: list[np.ndarray]  # per image (K,) int64 classes in 1..10


def _digits(split: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, targets = d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)
    cut = int(round(len(images) * (1 - val_fraction)))
    return (images[:cut], targets[:cut]) if split == "train" else (images[cut:], targets[cut:])


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture: a few coloured low-frequency sinusoids plus fine noise, in [0, 0.6]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(4):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
        img += np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None] * rng.uniform(0, 1, 3)
    img = (img - img.min()) / max(1e-6, float(img.max() - img.min()))
    return np.clip(0.45 * img + rng.normal(0, 0.04, img.shape), 0, 0.6).astype(np.float32)


def _upsample(digit: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(digit)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _place(taken: np.ndarray, side: int, rng: np.random.Generator, tries: int = 30) -> tuple[int, int] | None:
    size = taken.shape[0]
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if not taken[y:y + side, x:x + side].any():
            return y, x
    return None


def make_scenes(n: int, size: int = 64, split: str = "train", max_digits: int = 3, scale: tuple[int, int] = (16, 32),
                val_fraction: float = 0.2, seed: int = 0) -> Scenes:
    """``n`` scenes of ``size`` pixels with 1..``max_digits`` digits of side ``scale`` (inclusive range) each."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if not 4 <= scale[0] <= scale[1] <= size or max_digits < 1 or n < 1:
        raise ValueError(f"need n >= 1, max_digits >= 1 and 4 <= scale[0] <= scale[1] <= size; got n={n}, "
                         f"max_digits={max_digits}, scale={scale}, size={size}")
    digits, targets = _digits(split, val_fraction)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    boxes, labels = [], []
    for i in range(n):
        img, taken = _background(size, rng), np.zeros((size, size), bool)
        bx, lb = [], []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            side = int(rng.integers(scale[0], scale[1] + 1))
            at = _place(taken, side, rng)
            if at is None:
                continue
            y, x = at
            k = int(rng.integers(len(digits)))
            alpha = _upsample(digits[k], side)
            ink = alpha > _INK
            if not ink.any():
                continue
            colour = rng.uniform(0.7, 1.0, 3).astype(np.float32)
            patch = img[y:y + side, x:x + side]
            img[y:y + side, x:x + side] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
            masks[i, y:y + side, x:x + side][ink] = targets[k] + 1
            taken[y:y + side, x:x + side] = True
            ys, xs = np.nonzero(ink)
            bx.append([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1])
            lb.append(targets[k] + 1)
        images[i] = np.round(img * 255).astype(np.uint8)
        boxes.append(np.asarray(bx, np.float32).reshape(-1, 4))
        labels.append(np.asarray(lb, np.int64))
    return Scenes(images, masks, boxes, labels)


__all__ = ["NUM_CLASSES", "Scenes", "make_scenes"]
