"""Training objectives, one class per strategy (Xie thesis, Intriguing Properties of Adversarial Training, Sec 6.3).

Each objective maps (model, clean batch, adversarial batch, labels) to a loss and the logits to score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # logits of the images the accuracy is reported on (adversarial when there are any)
    clean_logits: torch.Tensor | None = None


class Madry:
    """100% adversarial: minimise J(adv) only (Madry et al. 2018; the IAT recipe)."""

    needs_attack = True

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits)


class Clean:
    """Standard training on clean images: the baseline adversarial training is compared against."""

    needs_attack = False

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits, logits)


class Mixed:
    """100% adv + 100% clean in one batch: a J(clean) + (1 - a) J(adv) (Goodfellow et al.; Sec 6.3, a = 0.5)."""

    needs_attack = True

    def __init__(self, clean_weight: float = 0.5, label_smoothing: float = 0.0):
        self.a, self.ls = clean_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().chunk(2)
        loss = self.a * F.cross_entropy(clean, y, label_smoothing=self.ls) + \
            (1 - self.a) * F.cross_entropy(adv, y, label_smoothing=self.ls)
        return StepOutput(loss, adv, clean)


def build_objective(cfg):
    if cfg.name == "madry":
        return Madry(cfg.label_smoothing)
    if cfg.name == "mixed":
        return Mixed(cfg.clean_weight, cfg.label_smoothing)
    return Clean(cfg.label_smoothing)
