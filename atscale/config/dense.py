"""The typed configuration of a dense-task run (issue 15; Xie thesis Ch. 2): a segmentation or detection model trained
on the embedded scenes or Pascal VOC, then attacked with DAG (Sec 2.3). Sections: data, model, optim, dag, run. The
task follows from ``model.arch``. ``dag.gamma`` is in 0..255 pixel units like every budget in atscale (the thesis'
gamma = 0.5); :attr:`DagCfg.gamma_fraction` is the [0, 1] value the attack uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from atscale.config.load import _apply, _set_overrides, parse_override
from atscale.config.schema import Sections
from atscale.errors import ConfigError
from atscale.fsio import atomic_write_bytes

SEGMENTATION_ARCHS = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                      "lraspp_mobilenet_v3_large")
DETECTION_ARCHS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")
DAG_ITERS = {"segmentation": 200, "detection": 150}  # the thesis' M_0 (Sec 2.3.1)


@dataclass
class DenseDataCfg:
    """Scenes (embedded, no download; :mod:`atscale.data.scenes`) or Pascal VOC on disk (never downloaded)."""

    source: Literal["scenes", "voc"] = "scenes"
    root: str = ""  # voc: the folder holding VOCdevkit/
    year: str = "2012"  # voc
    image_size: int = 96  # square side images are generated at (scenes) or resized to (voc)
    n_train: int = 1500  # scenes
    n_val: int = 64  # scenes
    max_digits: int = 4  # scenes: digits per image, 1..max_digits
    digit_size: list[int] = field(default_factory=lambda: [20, 36])  # scenes: a digit's side in pixels, [min, max]
    seed: int = 0  # scenes: the training scenes' layout (another seed = other training data)
    val_seed: int = 1000  # scenes: the validation scenes', shared by every run so perturbations transfer
    batch_size: int = 16
    eval_batch_size: int = 16
    flip: bool = True
    num_workers: int = 0


@dataclass
class DenseModelCfg:
    arch: str = "lraspp_mobilenet_v3_large"
    num_classes: int = 0  # 0 = the dataset's (scenes 11, VOC 21)
    weights: str = ""  # a local torchvision state dict (.pth / .safetensors); atscale never downloads weights
    options: dict[str, Any] = field(default_factory=dict)  # detection: torchvision FasterRCNN keyword arguments

    @property
    def task(self) -> str:
        return "segmentation" if self.arch in SEGMENTATION_ARCHS else "detection"


@dataclass
class DenseOptimCfg:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 8
    warmup_epochs: float = 0.5
    grad_clip: float = 10.0  # max gradient norm, 0 = off (Faster R-CNN from scratch spikes early)


@dataclass
class DagCfg:
    """DAG (Sec 2.3, Algorithm 1): ``gamma`` per-step L-inf size in 0..255 units; ``max_iters`` M_0, 0 = the task's
    (200 segmentation, 150 detection); ``perm_draws`` PERM controls averaged (Sec 2.3.5); ``images`` val images
    attacked, 0 = all; detection targets: RPN NMS ``nms`` and ``proposals`` kept, IoU and score thresholds."""

    gamma: float = 0.5
    max_iters: int = 0
    seed: int = 0
    perm_draws: int = 3
    images: int = 0
    batch_size: int = 8
    nms: float = 0.9
    proposals: int = 300
    iou_min: float = 0.1
    score_min: float = 0.1

    @property
    def gamma_fraction(self) -> float:
        return self.gamma / 255.0

    def iters_for(self, task: str) -> int:
        return self.max_iters or DAG_ITERS[task]


@dataclass
class DenseRunCfg:
    out_dir: str = "runs"
    name: str = "dense"
    seed: int = 0  # weights init and batch order
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    keep_last: int = 2


@dataclass
class DenseConfig(Sections):
    data: DenseDataCfg = field(default_factory=DenseDataCfg)
    model: DenseModelCfg = field(default_factory=DenseModelCfg)
    optim: DenseOptimCfg = field(default_factory=DenseOptimCfg)
    dag: DagCfg = field(default_factory=DagCfg)
    run: DenseRunCfg = field(default_factory=DenseRunCfg)

    @property
    def task(self) -> str:
        return self.model.task


def _validate(cfg: DenseConfig) -> None:
    archs = SEGMENTATION_ARCHS + DETECTION_ARCHS
    if cfg.model.arch not in archs:
        raise ConfigError(f"model.arch '{cfg.model.arch}' is not a dense model", f"use one of {', '.join(archs)}")
    d, g = cfg.data, cfg.dag
    checks = [(d.image_size >= 32, "data.image_size must be >= 32"),
              (d.source != "voc" or bool(d.root), "data.source=voc needs data.root, the folder holding VOCdevkit/"),
              (len(d.digit_size) == 2 and 4 <= d.digit_size[0] <= d.digit_size[1] <= d.image_size // 2,
               "data.digit_size must be [min, max] pixels with 4 <= min <= max <= data.image_size / 2"),
              (d.n_train > 0 and d.n_val > 0 and d.batch_size > 0 and d.eval_batch_size > 0,
               "data.n_train, n_val, batch_size and eval_batch_size must be > 0"),
              (cfg.model.num_classes == 0 or cfg.model.num_classes >= 3,
               "model.num_classes must be 0 (the dataset's) or >= 3 (background and two classes DAG can swap)"),
              (cfg.optim.lr > 0 and cfg.optim.epochs > 0, "optim.lr and optim.epochs must be > 0"),
              (g.gamma > 0 and g.max_iters >= 0 and g.perm_draws >= 0 and g.batch_size > 0,
               "dag.gamma and dag.batch_size must be > 0, dag.max_iters and dag.perm_draws >= 0"),
              (0 < g.nms <= 1 and g.proposals > 0, "dag.nms must be in (0, 1] and dag.proposals > 0")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.model.options.get("frozen_bn") and not cfg.model.weights:
        raise ConfigError("model.options.frozen_bn freezes the backbone's BatchNorm at loaded statistics, but "
                          "model.weights is empty (from scratch it would freeze the initial mean 0 / var 1)",
                          "set model.weights to a local torchvision state dict or drop frozen_bn")
    if cfg.task == "segmentation" and cfg.model.options:
        raise ConfigError("model.options are detection (FasterRCNN) arguments; a segmentation model takes none",
                          "remove model.options")


def dense_from_dict(values: dict[str, Any] | None) -> DenseConfig:
    cfg = DenseConfig()
    _apply(cfg, values or {}, "")
    _validate(cfg)
    return cfg


def load_dense_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DenseConfig:
    """Defaults <- YAML file <- dotted overrides (``optim.epochs=2``), validated before anything runs."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist", "pass an existing YAML file, e.g. "
                              "configs/dense/scenes_lraspp.yaml")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (data, model, optim, dag, run)")
        values = loaded or {}
    _set_overrides(values, overrides)
    return dense_from_dict(values)


def with_dense_overrides(cfg: DenseConfig, overrides: Sequence[str], sections: Sequence[str]) -> DenseConfig:
    """A validated copy of ``cfg`` with ``section.key=value`` overrides of the given ``sections`` only (``atscale dense
    dag`` keeps the trained run's data and model)."""
    for ov in overrides:
        section = parse_override(ov)[0][0]
        if section not in sections:
            raise ConfigError(f"override '{ov}' is not a {' / '.join(s + '.*' for s in sections)} setting",
                              "pass e.g. dag.max_iters=50")
    values = cfg.to_dict()
    _set_overrides(values, overrides)
    return dense_from_dict(values)


def save_dense_config(cfg: DenseConfig, path: str | Path) -> None:
    atomic_write_bytes(Path(path), cfg.to_yaml().encode())


__all__ = ["DenseConfig", "DenseDataCfg", "DenseModelCfg", "DenseOptimCfg", "DagCfg", "DenseRunCfg", "DAG_ITERS",
           "SEGMENTATION_ARCHS", "DETECTION_ARCHS", "load_dense_config", "dense_from_dict", "save_dense_config",
           "with_dense_overrides"]
