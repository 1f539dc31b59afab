"""The embedded scene dataset of the dense tasks (issue 15, first step): real digits on textured backgrounds with masks
and boxes that agree with each other, reproducible from the seed, train and val digits disjoint."""
from __future__ import annotations

import numpy as np
import pytest

from atscale.data.scenes import NUM_CLASSES, _digits, make_scenes


def test_masks_and_boxes_describe_the_same_digits() -> None:
    s = make_scenes(40, size=64, seed=3)
    assert s.images.shape == (40, 64, 64, 3) and s.images.dtype == np.uint8 and s.masks.shape == (40, 64, 64)
    assert s.masks.max() < NUM_CLASSES and sum(len(b) for b in s.boxes) >= 40
    for img_mask, boxes, labels in zip(s.masks, s.boxes, s.labels):
        assert len(boxes) == len(labels) >= 1 and set(labels.tolist()) <= set(range(1, NUM_CLASSES))
        covered = np.zeros_like(img_mask, bool)
        for (x1, y1, x2, y2), lab in zip(boxes.astype(int), labels):
            inside = img_mask[y1:y2, x1:x2]
            assert (inside == lab).any() and set(np.unique(inside).tolist()) <= {0, int(lab)}
            ys, xs = np.nonzero(inside == lab)  # the box is tight around its ink
            assert ys.min() == 0 and xs.min() == 0 and ys.max() == y2 - y1 - 1 and xs.max() == x2 - x1 - 1
            covered[y1:y2, x1:x2] = True
        assert not img_mask[~covered].any()  # no labelled pixel outside every box
        assert (img_mask == 0).mean() > 0.3  # mostly background


def test_scenes_are_reproducible_and_val_digits_come_from_another_part() -> None:
    a, b = make_scenes(5, seed=1), make_scenes(5, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, make_scenes(5, seed=2).images)
    assert not np.array_equal(a.images, make_scenes(5, seed=1, split="val").images)
    train, val = _digits("train", 0.2)[0], _digits("val", 0.2)[0]
    assert len(train) + len(val) == 1797 and len(val) == 359
    with pytest.raises(ValueError, match="scale"):
        make_scenes(3, size=16, scale=(8, 32))
