"""Fine-tuning a robust model on a new task (issue 16): a 5-digit subset of the digits data as the new ImageFolder-like
task, the robust digits model's timm export as the starting point (its 10-class head re-initialized as a 5-class one),
compared with the same run from random weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atscale.config import load_config
from atscale.data import ensure_dataset
from atscale.errors import CheckpointError, DatasetError
from atscale.models.export import export_timm
from atscale.train import main
from conftest import clearly_greater, tiny_overrides

SUBSET = [5, 6, 7, 8, 9]


def test_digits_subset_is_relabelled_and_a_folder_of_other_digits_is_refused(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=digits", f"data.root={tmp_path / 'd'}", f"data.digits_classes={SUBSET}"])
    meta = ensure_dataset(cfg.data)
    assert meta["classes"] == ["5", "6", "7", "8", "9"] and meta["num_classes"] == 5
    assert 0.75 * 900 < meta["n_train"] + meta["n_val"] < 1.1 * 900  # about half of the 1,797 digits
    other = load_config(None, ["data.source=digits", f"data.root={tmp_path / 'd'}", "data.digits_classes=[0, 1]"])
    with pytest.raises(DatasetError, match=r"holds the digits \['5', '6', '7', '8', '9'\].*another folder"):
        ensure_dataset(other.data)
    with pytest.raises(DatasetError, match="not a subset of the digits"):
        ensure_dataset(load_config(None, ["data.source=digits", f"data.root={tmp_path / 'e'}", "data.digits_classes=[3, 3]"]).data)


def _finetune_overrides(tmp_path: Path, name: str, init_from: str) -> list[str]:
    return tiny_overrides(tmp_path / "digits_5to9", tmp_path, name, **{
        "data.digits_classes": SUBSET, "model.init_from": init_from, "optim.lr": 0.1,
        "schedule.warmup_epochs": 0.0, "attack.iters": 1, "eval.every_epochs": 0, "eval.max_images": 0,
        "eval.steps": [1]})


def test_a_robust_export_fine_tunes_into_a_5_class_head_better_than_from_scratch(
        trained_digits_model, tmp_path: Path) -> None:
    """The acceptance case: model.init_from = local-dir:<timm export of a digits model> into a 5-class head trains,
    and after the same epoch (11 steps) it is clearly more accurate on the new task's val set than random initialization."""
    src, src_cfg = trained_digits_model
    export_timm(src, tmp_path / "export", mean=src_cfg.model.mean, std=src_cfg.model.std, input_size=32, crop_pct=1.0)
    tuned = main(load_config(None, _finetune_overrides(tmp_path, "tuned", f"local-dir:{tmp_path / 'export'}")))
    scratch = main(load_config(None, _finetune_overrides(tmp_path, "scratch", "")))
    ev_tuned = json.loads((tmp_path / "tuned" / "eval.json").read_text())
    ev_scratch = json.loads((tmp_path / "scratch" / "eval.json").read_text())
    n = ev_tuned["n"]
    assert n == ev_scratch["n"] and 0.15 * 900 < n < 0.25 * 900
    assert tuned["step"] == scratch["step"] == 717 // 64  # one epoch of the 5-digit task
    acc_tuned, acc_scratch = ev_tuned["results"]["clean"]["acc"], ev_scratch["results"]["clean"]["acc"]
    assert clearly_greater(acc_tuned, acc_scratch, n), (acc_tuned, acc_scratch)
    head = torch.load(tmp_path / "tuned" / "checkpoints" / "last.pt", weights_only=False)["model"]["net.fc.weight"]
    assert head.shape[0] == 5


def test_a_checkpoint_of_another_architecture_fails_before_any_work(trained_digits_model, tmp_path: Path) -> None:
    src, src_cfg = trained_digits_model
    export_timm(src, tmp_path / "export", mean=src_cfg.model.mean, std=src_cfg.model.std, input_size=32, crop_pct=1.0)
    over = _finetune_overrides(tmp_path, "wrong", f"local-dir:{tmp_path / 'export'}") + [
        "model.arch=test_vit", 'model.kwargs={"img_size": 32, "patch_size": 8}']
    with pytest.raises(CheckpointError, match="does not fit model 'VisionTransformer'.*only the classifier may differ"):
        main(load_config(None, over))
    assert not (tmp_path / "wrong" / "checkpoints").exists() or not any((tmp_path / "wrong" / "checkpoints").iterdir())
