"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on training batches, with the labels an adversarial attack
and a cross-entropy objective need, as the modern robust ImageNet recipes use them (ARES 2.0 robust_training,
Liu et al. 2023: Swin / ConvNeXt / ViT, 300 epochs AdamW, PGD-3 at 4/255, EMA, with the DeiT / ConvNeXt
Mixup 0.8 / CutMix 1.0).

Per micro-batch, after RandAugment / AutoAugment and before the attack (``atscale.training.loop``):

- images: timm's ``Mixup`` mixes each image with its mirror in the batch (image i with image B-1-i), by a convex
  combination (Mixup) or a pasted box (CutMix), per batch, pair or element (``data.mixup.mode``);
- ``soft``: the mixed soft targets lam * onehot_s(y_i) + (1 - lam) * onehot_s(y_{B-1-i}), where onehot_s is the one-hot
  vector smoothed by ``objective.label_smoothing`` s (1 - s + s/K on the label, s/K elsewhere). Label smoothing enters
  here, once: the objectives then take these targets with no smoothing of their own
  (``atscale.training.objectives.cross_entropy``). The training loss is the cross-entropy against ``soft``;
- ``hard``: each image's dominant label, argmax of ``soft`` (ties go to the lower class index). Step accuracies are
  reported against it;
- ``attack``: the labels the training attack maximizes the loss of, ``attack.mixup_labels``: ``soft`` (the default,
  as ARES: untargeted PGD ascends the same soft-target cross-entropy the model is trained on) or ``hard`` (the
  dominant label; targeted attacks draw their target from it).

timm draws lam, the CutMix box and the mode switches from numpy's global generator. ``Mixing`` runs each call on a
generator seeded from (seed, call count) swapped into numpy's global state and restores the caller's state after,
so the draws depend on (seed, calls) only, and ``calls`` travels in the checkpoint: a resumed run mixes exactly as an
unbroken one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from timm.data import Mixup

from atscale.config.schema import MixupCfg
from atscale.errors import ConfigError


@dataclass
class MixedBatch:
    x: torch.Tensor  # mixed images, float [0, 1], in the input's memory format
    soft: torch.Tensor  # [B, C] float soft targets (label smoothing included): what the objective's loss takes
    hard: torch.Tensor  # [B] long, argmax of soft: the labels step accuracies are measured against
    attack: torch.Tensor  # soft or hard, by attack.mixup_labels: the labels the training attack uses


def check_mixup(cfg: MixupCfg, batch_sizes: list[int]) -> None:
    """Ranges of ``data.mixup.*`` and even per-process batches (each image is mixed with its mirror in the batch)."""
    for key, value in (("mixup_alpha", cfg.mixup_alpha), ("cutmix_alpha", cfg.cutmix_alpha)):
        if value < 0:
            raise ConfigError(f"data.mixup.{key} = {value} is negative",
                              f"set data.mixup.{key} >= 0 (0 = off; the ARES recipe uses mixup 0.8, cutmix 1.0)")
    for key, value in (("prob", cfg.prob), ("switch_prob", cfg.switch_prob)):
        if not 0 <= value <= 1:
            raise ConfigError(f"data.mixup.{key} = {value} is not a probability", f"set data.mixup.{key} in [0, 1]")
    odd = sorted({b for b in batch_sizes if b % 2})
    if odd:
        raise ConfigError(f"data.mixup pairs image i with image B-1-i of each batch, but the per-process batch size "
                          f"{odd[0]} is odd", "use even data.batch_size (and data.phases batch_size) values")


class Mixing:
    """``mixing(x, y) -> MixedBatch``: a seeded timm ``Mixup`` (see the module docstring for the labels)."""

    def __init__(self, cfg: MixupCfg, num_classes: int, label_smoothing: float = 0.0,
                 attack_labels: Literal["soft", "hard"] = "soft", seed: int = 0) -> None:
        if not cfg.on:
            raise ConfigError("data.mixup is off (mixup_alpha = cutmix_alpha = 0) but a Mixing was built",
                              "set data.mixup.mixup_alpha or data.mixup.cutmix_alpha > 0")
        if attack_labels not in ("soft", "hard"):
            raise ConfigError(f"attack.mixup_labels = {attack_labels!r} is unknown", "use soft or hard")
        check_mixup(cfg, [])
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                           switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=label_smoothing,
                           num_classes=num_classes)
        self.attack_labels = attack_labels
        self.seed = seed
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> MixedBatch:
        if x.shape[0] % 2:
            raise ConfigError(f"data.mixup got a batch of {x.shape[0]} images; it pairs image i with image B-1-i",
                              "use an even data.batch_size")
        self.calls += 1
        saved = np.random.get_state()
        np.random.set_state(self._state())
        try:
            mixed, soft = self.mixup(x.detach().clone(memory_format=torch.preserve_format), y)
        finally:
            np.random.set_state(saved)
        hard = soft.argmax(1)
        return MixedBatch(mixed, soft, hard, soft if self.attack_labels == "soft" else hard)

    def _state(self) -> tuple:
        seq = np.random.SeedSequence([self.seed & 0xFFFF_FFFF_FFFF_FFFF, self.calls])
        return np.random.RandomState(np.random.MT19937(seq)).get_state()

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))


def build_mixing(cfg, num_classes: int, seed: int) -> Mixing | None:
    """The run's ``Mixing`` from ``data.mixup``, ``objective.label_smoothing`` and ``attack.mixup_labels``; None
    when mixing is off."""
    if not cfg.data.mixup.on:
        return None
    check_mixup(cfg.data.mixup, [cfg.data.batch_size] + [ph["batch_size"] for ph in cfg.data.phases
                                                          if "batch_size" in ph])
    return Mixing(cfg.data.mixup, num_classes, cfg.objective.label_smoothing, cfg.attack.mixup_labels, seed)


__all__ = ["Mixing", "MixedBatch", "build_mixing", "check_mixup"]
