"""Dense-task datasets (issue 15; Xie thesis Sec 2.3.3): the embedded scenes and a real, tiny Pascal VOC folder written
here (JPEGs, palette PNG masks with a 255 border, XML annotations with a difficult object) read through torchvision,
in one item format; collate and the seeded loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atscale.data.dense import VOC_CLASSES, SceneDataset, VOCDense, collate_dense, dense_datasets, dense_loader
from atscale.errors import ConfigError, DatasetError

VOC_IDS = ("2008_000001", "2008_000002", "2008_000003")
SIZES = {"2008_000001": (40, 30), "2008_000002": (24, 36), "2008_000003": (32, 32)}  # (W, H)
OBJECTS = {  # name, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult
    "2008_000001": [("dog", (5, 3, 20, 14), 0), ("cat", (22, 10, 38, 28), 1), ("person", (30, 2, 40, 12), 0)],
    "2008_000002": [("aeroplane", (1, 1, 24, 36), 0)],
    "2008_000003": [],
}


def _palette_png(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[1:21] = np.random.default_rng(0).integers(0, 256, (20, 3))
    palette[255] = (224, 224, 192)
    img.putpalette(palette.reshape(-1).tolist())
    img.save(path)


def _xml(name: str, w: int, h: int, objects: list) -> str:
    objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return (f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>1</segmented>{objs}</annotation>")


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in VOC_IDS:
        w, h = SIZES[name]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "Annotations" / f"{name}.xml").write_text(_xml(name, w, h, OBJECTS[name]))
        mask = np.zeros((h, w), np.uint8)
        mask[2:h // 2, 3:w // 2] = 255  # object with a 255 border, VOC style
        mask[3:h // 2 - 1, 4:w // 2 - 1] = 12  # dog
        mask[h // 2:, w // 2:] = 15  # person
        _palette_png(voc / "SegmentationClass" / f"{name}.png", mask)
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_IDS[:2]) + "\n")
    (voc / "ImageSets/Main/train.txt").write_text("\n".join(VOC_IDS) + "\n")
    return tmp_path


def test_scene_items_have_the_format_and_boxes_match_masks() -> None:
    ds = SceneDataset.from_args(6, size=48, seed=2)
    assert len(ds) == 6 and ds.num_classes == 11 and ds.class_names[:2] == ("background", "0")
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, 48, 48) and it["image"].dtype == torch.float32
        assert 0 <= float(it["image"].min()) and float(it["image"].max()) <= 1
        assert it["mask"].shape == (48, 48) and it["mask"].dtype == torch.int64
        assert it["boxes"].dtype == torch.float32 and it["boxes"].shape == (len(it["labels"]), 4)
        assert it["labels"].dtype == torch.int64 and bool(((it["labels"] >= 1) & (it["labels"] <= 10)).all())
        covered = torch.zeros(48, 48, dtype=torch.bool)
        for (x1, y1, x2, y2), lab in zip(it["boxes"].long().tolist(), it["labels"].tolist()):
            assert bool((it["mask"][y1:y2, x1:x2] == lab).any())
            covered[y1:y2, x1:x2] = True
        assert not bool(it["mask"][~covered].any())


def test_voc_segmentation_resizes_masks_with_nearest(voc_root: Path) -> None:
    ds = VOCDense(voc_root, task="segmentation", image_set="train", size=20)
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[12] == "dog" and ds.class_names[-1] == "tvmonitor"
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, 20, 20) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (20, 20) and it["mask"].dtype == torch.int64
        assert set(it["mask"].unique().tolist()) == {0, 12, 15, 255}  # nearest: no invented labels
        assert it["boxes"].shape == (0, 4) and it["labels"].shape == (0,)


def test_voc_detection_scales_boxes_and_ignores_difficult(voc_root: Path) -> None:
    ds = VOCDense(voc_root, task="detection", size=20)
    assert len(ds) == 3
    it = ds[0]  # 40 x 30 image -> 20 x 20: x * 0.5, y * 2/3; 1-based (5, 3, 20, 14) -> 0-based (4, 2, 20, 14)
    assert it["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert torch.allclose(it["boxes"], torch.tensor([[2, 4 / 3, 10, 28 / 3], [14.5, 2 / 3, 20, 8]]))
    assert bool((it["mask"] == 255).all()) and it["mask"].shape == (20, 20)
    whole = ds[1]  # a box over the whole 24 x 36 image covers the whole resized image
    assert torch.allclose(whole["boxes"], torch.tensor([[0.0, 0, 20, 20]]))
    assert ds[2]["boxes"].shape == (0, 4) and ds[2]["labels"].shape == (0,)
    assert it["ignore_labels"].tolist() == [VOC_CLASSES.index("cat")]  # difficult: scaled like the others
    assert torch.allclose(it["ignore_boxes"], torch.tensor([[10.5, 6, 19, 56 / 3]]))
    assert ds[1]["ignore_boxes"].shape == (0, 4)
    kept = VOCDense(voc_root, task="detection", size=20, keep_difficult=True)[0]
    assert kept["labels"].tolist() == [12, 8, 15] and kept["ignore_labels"].shape == (0,)


def test_voc_missing_root_and_layout_errors(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"VOCdevkit/VOC2012.*never downloads.*VOCtrainval_11-May-2012\.tar"):
        VOCDense(tmp_path / "nowhere")
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").unlink()
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/train\.txt"):
        VOCDense(voc_root, task="segmentation")
    with pytest.raises(ConfigError, match="'segmentation' or 'detection'"):
        VOCDense(voc_root, task="depth")
    with pytest.raises(ConfigError, match="train, val, trainval"):
        VOCDense(voc_root, task="detection", image_set="test")


def test_collate_and_seeded_loader(voc_root: Path) -> None:
    ds = SceneDataset.from_args(10, size=32, seed=0)
    batches = list(dense_loader(ds, batch_size=4, shuffle=True, seed=7, distributed=True))  # no process group: plain
    assert [len(b["boxes"]) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["mask"].shape == (4, 32, 32) and b["mask"].dtype == torch.int64
    assert all(x.shape[1] == 4 for x in b["boxes"]) and len(b["labels"]) == 4
    again = next(iter(dense_loader(ds, batch_size=4, shuffle=True, seed=7)))
    assert torch.equal(again["image"], b["image"])
    det = next(iter(dense_loader(VOCDense(voc_root, task="detection", size=16), 3, shuffle=False, seed=0)))
    assert [len(x) for x in det["labels"]] == [2, 1, 0] and det["image"].shape == (3, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"mixes image sizes.*size="):
        collate_dense([ds[0], SceneDataset.from_args(1, size=40)[0]])


def test_dense_datasets_from_a_data_config(voc_root: Path) -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(source="scenes", root="", year="2012", image_size=32, n_train=5, n_val=3, max_digits=2,
                          digit_size=[8, 16], seed=0, val_seed=1000)
    train, val = dense_datasets(cfg, "segmentation")
    assert (len(train), len(val)) == (5, 3) and val[0]["image"].shape == (3, 32, 32)
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Main/val.txt").write_text(VOC_IDS[2] + "\n")
    train, val = dense_datasets(SimpleNamespace(**{**vars(cfg), "source": "voc", "root": str(voc_root)}), "detection")
    assert (len(train), len(val)) == (3, 1) and train.num_classes == 21
    with pytest.raises(ConfigError, match="data.root"):
        dense_datasets(SimpleNamespace(**{**vars(cfg), "source": "voc"}), "detection")
