"""Shared fixtures: one digits FFCV dataset and one briefly trained tiny model per test session (real FFCV, real timm)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_MODEL = {"arch": "resnet18", "kwargs": {"channels": [8, 16, 32, 64]}, "mean": [0.5, 0.5, 0.5],
              "std": [0.5, 0.5, 0.5]}


def tiny_overrides(root: Path, out: Path, name: str, **extra: object) -> list[str]:
    """Overrides for a fast CPU run on the digits fixture; extra keys are 'section.key' -> value."""
    base = {
        "data.source": "digits", "data.root": str(root), "data.batch_size": 64, "data.eval_batch_size": 200,
        "data.image_size": 32, "data.val_size": 32, "data.val_crop_ratio": 1.0, "data.flip": False,
        "data.rrc_scale": [0.6, 1.0], "data.num_workers": 2,
        "model.arch": TINY_MODEL["arch"], "model.kwargs": TINY_MODEL["kwargs"], "model.mean": TINY_MODEL["mean"],
        "model.std": TINY_MODEL["std"],
        "attack.name": "pgd", "attack.eps": 32, "attack.step": 16, "attack.iters": 2, "attack.targeted": False,
        "objective.name": "madry", "objective.label_smoothing": 0.0,
        "optim.lr": 0.4, "optim.weight_decay": 5e-4,
        "schedule.epochs": 1, "schedule.name": "cosine", "schedule.warmup_epochs": 0.5,
        "eval.steps": [2], "eval.eps": 32, "eval.step": 8, "eval.targeted": False, "eval.every_epochs": 0,
        "eval.max_images": 200,
        "log.progress": False, "log.tensorboard": False,
        "run.out_dir": str(out), "run.name": name, "run.export": False,
    }
    base.update(extra)
    import json

    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def clearly_greater(a: float, b: float, n: int, z: float = 3.09) -> bool:
    """One-sided two-proportion z-test: accuracy ``a`` exceeds ``b`` (both over ``n`` images) at p < 0.001. Trained test
    models differ from machine to machine (CPU kernels round differently), so "clearly better" is a significance
    test, not a fixed margin; treating the two counts as independent is conservative for paired images."""
    pooled = (a + b) / 2
    se = (2 * pooled * (1 - pooled) / n) ** 0.5
    return a > b and (se == 0 or (a - b) / se > z)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from atscale.data import build_digits

    root = tmp_path_factory.mktemp("digits")
    build_digits(root, size=32, val_fraction=0.2, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_digits_model(digits_root, tmp_path_factory):
    """A tiny timm ResNet trained cleanly on digits for a few epochs (~95% clean accuracy), in eval mode."""
    from atscale.config import load_config
    from atscale.checkpoint import model_from_checkpoint
    from atscale.train import main

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, tiny_overrides(digits_root, out, "clean", **{
        "objective.name": "clean", "attack.name": "none", "schedule.epochs": 4}))
    main(cfg)
    model, cfg, meta = model_from_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", torch.device("cpu"))
    return model, cfg


@pytest.fixture(scope="session")
def digits_val_batch(digits_root):
    """The first 200 val images and labels as float [0, 1] NCHW tensors."""
    from atscale.config import DataCfg
    from atscale.data import make_loader

    cfg = DataCfg(root=str(digits_root), eval_batch_size=200, image_size=32, val_size=32, val_crop_ratio=1.0)
    x, y = next(iter(make_loader(digits_root, "val", cfg, torch.device("cpu"), 0, train=False)))
    return x, y
