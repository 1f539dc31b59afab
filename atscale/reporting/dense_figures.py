"""Figures of the dense tasks under DAG (Xie thesis Fig. 2.1-2.3): per example the clean image with the model's
prediction, the perturbation (amplified), the adversarial image with its prediction, and the ground truth; the number
of active targets per DAG iteration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from atscale.reporting.report import _new_figure, _save, plot_measured


def _palette(n: int = 256) -> np.ndarray:
    """VOC's colour map: class c's colour from the bits of c (background black, 255 white)."""
    cmap = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        cmap[c] = (r, g, b)
    cmap[255] = (255, 255, 255)
    return cmap


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def _boxes(ax: Any, boxes: torch.Tensor, labels: torch.Tensor, colour: str, scores: torch.Tensor | None = None,
           min_score: float = 0.5) -> None:
    from matplotlib.patches import Rectangle

    for i, (b, lb) in enumerate(zip(boxes.tolist(), labels.tolist())):
        if scores is not None and float(scores[i]) < min_score:
            continue
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color=colour, lw=1))
        ax.text(b[0], b[1], str(lb - 1), color=colour, fontsize=6, va="bottom")


def _panel(ax: Any, image: torch.Tensor, task: str, pred: Any, title: str) -> None:
    if task == "segmentation":
        ax.imshow(_palette()[pred.numpy()], interpolation="nearest")
    else:
        ax.imshow(_hwc(image))
        _boxes(ax, pred["boxes"], pred["labels"], "yellow", pred["scores"])
    ax.set_title(title, fontsize=7)


def plot_examples(ex: dict[str, Any], task: str, path: Path, title: str) -> Path:
    """Rows: examples; columns: image, prediction, r, adversarial image, prediction, ground truth. Digit labels are
    printed as the class minus one (the digit itself on the scenes)."""
    n = ex["image"].shape[0]
    fig, _ = _new_figure((9, 1.6 * n + 0.4), 1)
    fig.clear()
    axes = fig.subplots(n, 6, squeeze=False)
    for i in range(n):
        row = axes[i]
        row[0].imshow(_hwc(ex["image"][i]))
        row[0].set_title("clean image", fontsize=7)
        _panel(row[1], ex["image"][i], task, ex["clean"][i], "prediction")
        row[2].imshow(_hwc(ex["r"][i]))
        row[2].set_title("r (amplified)", fontsize=7)
        row[3].imshow(_hwc(ex["adv"][i]))
        row[3].set_title("DAG image", fontsize=7)
        _panel(row[4], ex["adv"][i], task, ex["dag"][i], "prediction")
        if task == "segmentation":
            row[5].imshow(_palette()[ex["gt_mask"][i].numpy()], interpolation="nearest")
        else:
            row[5].imshow(_hwc(ex["image"][i]))
            _boxes(row[5], ex["gt_boxes"][i], ex["gt_labels"][i], "lime")
        row[5].set_title("ground truth", fontsize=7)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_active(curve: list[int], path: Path, title: str) -> Path:
    """Active targets (still correctly classified) summed over the attacked images, per DAG iteration."""
    fig, ax = _new_figure((4.5, 3))
    plot_measured(ax, list(range(len(curve))), curve)
    ax.set_xlabel("DAG iteration")
    ax.set_ylabel("active targets")
    ax.set_yscale("symlog")
    ax.set_title(title, fontsize=8)
    return _save(fig, path)


__all__ = ["plot_examples", "plot_active"]
