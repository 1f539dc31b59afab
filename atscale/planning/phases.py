"""The phases of a training run and the images it trains on, as ``atscale plan`` (:mod:`atscale.planning`) counts
them: ``data.phases`` (Wong et al.'s progressive resizing, AdvXL's coarse-to-fine stages), the dataset size, and the
images an epoch keeps on N GPUs (``atscale.data.loaders``: drop_last per rank, whole optimizer steps).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atscale.config import Config
from atscale.errors import ConfigError

# training images when data.root holds no meta.json yet (ImageNet-1k train split; CIFAR-10 train split)
DEFAULT_IMAGES = {"imagefolder": 1_281_167, "cifar10": 50_000}


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase: epochs ``start``..``end`` at ``image_size`` with the attack's ``attack_iters`` / eps /
    step (0..255 units) and ``token_drop`` (timm's ``patch_drop_rate`` in the optimizer's passes; ``data.phases``,
    the whole run when there are none)."""

    index: int
    start: int
    end: int
    image_size: int
    batch_size: int
    attack_iters: int
    attack_eps: float
    attack_step: float
    token_drop: float

    @property
    def epochs(self) -> int:
        return self.end - self.start


@dataclass
class PhaseCost:
    """Counted FLOPs per training image of one phase (:func:`atscale.planning.flops.count_phase`)."""

    spec: PhaseSpec
    forward: float
    attack_step: float
    attack_fixed: float
    update: float
    replays: int
    counted_on: str = "cpu"  # fake (FakeTensorMode: no arithmetic) | cpu

    @property
    def attack(self) -> float:
        return self.attack_fixed + self.spec.attack_iters * self.attack_step

    @property
    def per_image(self) -> float:
        return self.replays * (self.attack + self.update)


def phases_of(cfg: Config) -> list[PhaseSpec]:
    """The run's phases (``data.phases``, Wong et al.'s progressive resizing / AdvXL's coarse-to-fine stages), each
    key unset in a phase taking the run's value."""
    d, a = cfg.data, cfg.attack
    raw = d.phases or [{"until_epoch": cfg.schedule.epochs}]
    base_drop = float(cfg.model.kwargs.get("patch_drop_rate", 0.0))
    out, start = [], 0
    for i, ph in enumerate(raw):
        out.append(PhaseSpec(i, start, int(ph["until_epoch"]), int(ph.get("image_size", d.image_size)),
                             int(ph.get("batch_size", d.batch_size)), int(ph.get("attack_iters", a.iters)),
                             float(ph.get("attack_eps", a.eps)), float(ph.get("attack_step", a.step)),
                             float(ph.get("token_drop", base_drop))))
        start = out[-1].end
    return out


def _meta(cfg: Config) -> dict[str, Any]:
    path = Path(cfg.data.root) / "meta.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def dataset_images(cfg: Config, images: int | None = None) -> tuple[int, str]:
    """Training images per epoch before batching, and where the number comes from: ``--images``, else ``meta.json``
    of ``data.root``, else the source's standard train split (digits: the split ``atscale data digits`` writes)."""
    if images is not None:
        return images, "--images"
    meta = _meta(cfg)
    if meta.get("n_train"):
        return int(meta["n_train"]), f"{Path(cfg.data.root) / 'meta.json'}"
    if cfg.data.source == "digits":
        from atscale.data.sources import digits_splits

        train, _, _ = digits_splits(8, cfg.data.digits_val_fraction, cfg.run.seed, cfg.data.digits_classes)
        return len(train.labels), "scikit-learn digits, the split atscale data digits writes"
    return DEFAULT_IMAGES[cfg.data.source], f"the {cfg.data.source} train split by default, --images N to change"


def num_classes(cfg: Config) -> int:
    meta = _meta(cfg)
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if meta.get("num_classes"):
        return int(meta["num_classes"])
    return {"imagefolder": 1000}.get(cfg.data.source, 10)


def epoch_images(images: int, spec: PhaseSpec, gpus: int, accum: int) -> int:
    """Images one epoch trains on with ``gpus`` ranks: each rank takes images // gpus and drops its last partial
    batch, and an epoch keeps whole optimizer steps of ``accum`` micro-batches (``atscale.data.loaders``)."""
    micro = images // gpus // spec.batch_size // accum * accum
    if micro == 0:
        raise ConfigError(f"phase {spec.index}: {images} images on {gpus} GPUs give no full batch of "
                          f"{spec.batch_size} x dist.grad_accum {accum} per GPU",
                          "use fewer GPUs, a smaller data.batch_size or more images")
    return micro * spec.batch_size * gpus

