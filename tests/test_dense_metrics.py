"""Dense-task metrics (issue 15; Xie thesis Sec 2.3.3): mIoU against a confusion matrix worked out by hand, and mAP@0.5
through torchmetrics/pycocotools against COCO's 101-point interpolated AP worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atscale.evaluation.dense_metrics import DetectionMAP, MeanIoU, confusion_matrix

I = 255
TARGET = torch.tensor([[[0, 0, 1], [1, 1, I]], [[0, 0, 0], [2, 2, I]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]], [[0, 0, 0], [2, 1, 0]]])


def test_confusion_matrix_by_hand_skips_ignore_and_accumulates() -> None:
    # counted pixels (target, pred): image 1: (0,0) (0,1) (1,1) (1,1) (1,0); image 2: (0,0) x3 (2,2) (2,1);
    # the two ignore pixels (predicted 2 and 0) count nowhere
    expected = torch.tensor([[4, 1, 0, 0], [1, 2, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    mat = confusion_matrix(PRED, TARGET, 4)
    assert mat.dtype == torch.int64 and torch.equal(mat, expected)
    acc = torch.zeros(4, 4, dtype=torch.int64)
    confusion_matrix(PRED[:1], TARGET[:1], 4, out=acc)
    confusion_matrix(PRED[1:], TARGET[1:], 4, out=acc)
    assert torch.equal(acc, expected)
    with pytest.raises(ValueError, match=r"\(2, 2, 3\).*\(2, 3, 3\)"):
        confusion_matrix(PRED, torch.zeros(2, 3, 3, dtype=torch.long), 4)


def test_miou_by_hand_with_absent_class_excluded() -> None:
    # IoU_0 = 4 / (5 + 5 - 4) = 2/3, IoU_1 = 2 / (3 + 4 - 2) = 2/5, IoU_2 = 1 / (2 + 1 - 1) = 1/2; class 3 absent
    m = MeanIoU(4)
    m.update(PRED[:1], TARGET[:1])
    m.update(F.one_hot(PRED[1:], 4).permute(0, 3, 1, 2).float(), TARGET[1:])  # logits path, same labels
    out = m.compute()
    assert out["miou"] == pytest.approx((2 / 3 + 2 / 5 + 1 / 2) / 3)
    assert out["per_class"][:3] == pytest.approx([2 / 3, 2 / 5, 1 / 2]) and out["per_class"][3] is None
    assert out["pixel_acc"] == pytest.approx(7 / 10) and out["n_images"] == 2
    m.reset()
    assert math.isnan(m.compute()["miou"]) and m.compute()["n_images"] == 0


def test_miou_perfect_and_false_positive_class_counts() -> None:
    m = MeanIoU(3)
    m.update(TARGET.clamp(max=2).where(TARGET != I, 0), TARGET)
    assert m.compute()["miou"] == 1.0 and m.compute()["pixel_acc"] == 1.0
    fp = MeanIoU(3)  # class 1 only predicted, never in the target: its union is non-empty, IoU 0 counts
    fp.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    assert fp.compute()["per_class"] == [0.5, 0.0, None] and fp.compute()["miou"] == pytest.approx(0.25)


def test_miou_rejects_masks_of_another_size() -> None:
    m = MeanIoU(4)
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(16, 16\).*nearest"):
        m.update(torch.zeros(1, 4, 8, 8), torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="5 channels"):
        m.update(torch.zeros(1, 5, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))


def _det(boxes: list, scores: list, labels: list) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}


GT = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1])},
      {"boxes": torch.tensor([[5.0, 5, 25, 15]]), "labels": torch.tensor([2])},
      {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without ground truth


def test_map_perfect_and_empty_detections() -> None:
    perfect = DetectionMAP()
    perfect.update([_det(g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in GT], GT)
    assert perfect.compute() == {"map50": pytest.approx(1.0), "n_images": 3}
    none = DetectionMAP()
    none.update([_det([], [], []) for _ in GT], GT)
    assert none.compute()["map50"] == 0.0
    no_gt = DetectionMAP()
    no_gt.update([_det([[0, 0, 5, 5]], [0.5], [1])], GT[2:])
    assert math.isnan(no_gt.compute()["map50"])


def test_map_one_tp_below_one_fp_and_101_point_interpolation() -> None:
    # One ground truth, a false positive at score 0.9 then the true positive at 0.8: precision/recall after each
    # detection (0, 0) then (0.5, 1); the interpolated precision (max to the right) is 0.5 at every one of the 101
    # recall points 0, 0.01, ..., 1, so AP = 0.5.
    m = DetectionMAP()
    one_gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    m.update([_det([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])], [one_gt])
    assert m.compute()["map50"] == pytest.approx(0.5)
    # Two ground truths, TP 0.9, FP 0.8, TP 0.7: (P, R) = (1, .5), (.5, .5), (2/3, 1); interpolated precision is 1
    # at the 51 recall points 0..0.50 and 2/3 at the 50 points 0.51..1, so AP = (51 + 50 * 2/3) / 101 = 0.83498.
    m = DetectionMAP()
    m.update([_det([[0, 0, 10, 10], [40, 40, 50, 50], [21, 21, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1])], GT[:1])
    assert m.compute()["map50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)


def test_map_ignored_objects_are_neither_hit_nor_miss() -> None:
    # One ordinary and one ignored (VOC difficult) ground truth. A detection on the ignored one, scored above the
    # true positive, would be a false positive (AP 0.5, as above) if the object were dropped; ignored, it is not
    # counted, and missing the ignored object costs no recall: AP = 1.
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
          "ignore_boxes": torch.tensor([[40.0, 40, 50, 50]]), "ignore_labels": torch.tensor([1])}
    dropped = DetectionMAP()
    dropped.update([_det([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])], [{k: gt[k] for k in
                                                                                      ("boxes", "labels")}])
    assert dropped.compute()["map50"] == pytest.approx(0.5)
    ignored = DetectionMAP()
    ignored.update([_det([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])], [gt])
    assert ignored.compute()["map50"] == pytest.approx(1.0)
    missed = DetectionMAP()
    missed.update([_det([[0, 0, 10, 10]], [0.8], [1])], [gt])
    assert missed.compute()["map50"] == pytest.approx(1.0)


def test_map_input_checks() -> None:
    m = DetectionMAP()
    with pytest.raises(ValueError, match="2 prediction dicts for 1 target"):
        m.update([_det([], [], [])] * 2, GT[:1])
    with pytest.raises(ValueError, match="must match"):
        m.update([_det([[0, 0, 1, 1]], [0.5, 0.4], [1])], GT[:1])
