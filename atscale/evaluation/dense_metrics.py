"""Metrics of the dense tasks that DAG attacks (Xie thesis Sec 2.3.3 and 2.4): mean IoU for semantic segmentation and
mAP at IoU 0.5 for object detection, the two numbers of Tables 2.1-2.4 (ORIG vs ADVR).

- mIoU follows the Pascal VOC convention: one confusion matrix over all pixels of all images (rows target, columns
  prediction), IoU_c = TP_c / (TP_c + FP_c + FN_c), averaged over the classes whose union is non-empty, background
  included; pixels whose target is ``ignore_index`` (255, VOC's object borders) count nowhere.
- mAP@0.5 is torchmetrics' ``MeanAveragePrecision`` on the pycocotools backend (COCO's 101-point interpolated AP,
  one IoU threshold of 0.5, at most 100 detections per image), averaged over the classes present in the ground truth.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

__all__ = ["confusion_matrix", "MeanIoU", "DetectionMAP"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """(C, C) int64 counts, rows target class, columns predicted class; added to ``out`` (and returned) when given."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}; "
                         "pass labels of the same (N, H, W) size")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    for name, v in (("target", t), ("prediction", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(f"{name} labels span {int(v.min())}..{int(v.max())}, outside 0..{num_classes - 1} "
                             f"(ignore_index {ignore_index}); check num_classes and the mask encoding")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    mat = counts.reshape(num_classes, num_classes).to(torch.int64)
    if out is None:
        return mat
    out += mat.to(out.device)
    return out


class MeanIoU:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives mIoU, per-class IoU and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 2:
            raise ValueError(f"num_classes = {num_classes}; segmentation needs at least 2 (background and one class)")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.n_images = 0

    def update(self, pred_or_logits: torch.Tensor, target: torch.Tensor) -> None:
        """``pred_or_logits``: (N, C, H, W) scores (argmax over C) or (N, H, W) labels; ``target``: (N, H, W)."""
        pred = pred_or_logits.detach()
        if pred.dim() == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels but the metric has {self.num_classes} "
                                 "classes; build MeanIoU(num_classes) to match the model's output")
            pred = pred.argmax(1)
        if pred.dim() != 3 or target.dim() != 3:
            raise ValueError(f"expected (N, C, H, W) logits or (N, H, W) labels and (N, H, W) targets; got "
                             f"{tuple(pred_or_logits.shape)} and {tuple(target.shape)}")
        if pred.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"prediction size {tuple(pred.shape[-2:])} differs from mask size "
                             f"{tuple(target.shape[-2:])}; resize the masks to the prediction size with nearest "
                             "interpolation (never bilinear: it invents labels) or upsample the logits")
        confusion_matrix(pred, target.detach().to(pred.device), self.num_classes, self.ignore_index, out=self.matrix)
        self.n_images += int(target.shape[0])

    def compute(self) -> dict[str, Any]:
        """``miou`` and ``pixel_acc`` are NaN before any pixel was counted; ``per_class[c]`` is None when class c is
        absent from both the targets and the predictions."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
        total = float(m.sum())
        return {
            "miou": float(iou[present].mean()) if bool(present.any()) else math.nan,
            "per_class": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
            "pixel_acc": float(tp.sum()) / total if total else math.nan,
            "n_images": self.n_images,
        }


def _require_torchmetrics() -> type:
    missing = [m for m in ("torchmetrics", "pycocotools") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"detection mAP needs {' and '.join(missing)}; install it with "
                          "`pip install 'torchmetrics>=1.0' 'pycocotools>=2.0'`")
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision


def _as_tensors(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k in keys:
        if k not in d:
            raise ValueError(f"detection dict has keys {sorted(d)} but needs {list(keys)}")
        v = torch.as_tensor(d[k]).detach().cpu()
        out[k] = v.reshape(-1, 4).float() if k == "boxes" else (v.reshape(-1).long() if k == "labels"
                                                                else v.reshape(-1).float())
    if len(out["boxes"]) != len(out["labels"]) or ("scores" in out and len(out["scores"]) != len(out["labels"])):
        raise ValueError(f"one detection dict has {len(out['boxes'])} boxes and {len(out['labels'])} labels"
                         + (f" and {len(out['scores'])} scores" if "scores" in out else "") + "; they must match")
    return out


def _with_ignored(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    t = _as_tensors(target, ("boxes", "labels"))
    if "ignore_boxes" not in target:
        return t
    ign = _as_tensors({"boxes": target["ignore_boxes"], "labels": target.get("ignore_labels", ())},
                      ("boxes", "labels"))
    crowd = torch.cat([torch.zeros(len(t["labels"]), dtype=torch.long), torch.ones(len(ign["labels"]),
                                                                                  dtype=torch.long)])
    return {"boxes": torch.cat([t["boxes"], ign["boxes"]]), "labels": torch.cat([t["labels"], ign["labels"]]),
            "iscrowd": crowd}


class DetectionMAP:
    """mAP at IoU 0.5 (VOC's criterion) through torchmetrics with the pycocotools backend; boxes are xyxy pixels."""

    def __init__(self, max_detections: int = 100):
        metric_cls = _require_torchmetrics()
        self._metric = metric_cls(iou_thresholds=[0.5], box_format="xyxy", class_metrics=False,
                                  max_detection_thresholds=[1, 10, max_detections], backend="pycocotools")
        self.n_images = 0

    def reset(self) -> None:
        self._metric.reset()
        self.n_images = 0

    def update(self, preds: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
        """``preds``: per image ``{boxes (K, 4), scores (K,), labels (K,)}``; ``targets``: ``{boxes, labels}`` and
        optionally ``{ignore_boxes, ignore_labels}``, objects that are neither a hit nor a miss (VOC's difficult ones;
        scored as COCO crowd regions: a detection on one is not a false positive). K may be 0 on either side."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} prediction dicts for {len(targets)} target dicts; pass one of each per "
                             "image")
        p = [_as_tensors(d, ("boxes", "scores", "labels")) for d in preds]
        t = [_with_ignored(d) for d in targets]
        self._metric.update(p, t)
        self.n_images += len(preds)

    def compute(self) -> dict[str, Any]:
        """``map50`` is NaN when no image had a ground-truth box (AP is undefined without positives)."""
        value = float(self._metric.compute()["map"])
        return {"map50": math.nan if value < 0 else value, "n_images": self.n_images}
