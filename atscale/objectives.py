"""Training objectives, one class per strategy (Xie thesis, Intriguing Properties of Adversarial Training, Sec 6.3).

Each objective maps (model, clean batch, adversarial batch, labels) to a loss and the logits to score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.layers.context import domain_split


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # logits of the images the accuracy is reported on (adversarial when there are any)
    clean_logits: torch.Tensor | None = None


class Madry:
    """100% adversarial: minimise J(adv) only (Madry et al. 2018; the IAT recipe)."""

    needs_attack = True
    attack_domain: str | None = None  # BN domain the attack runs through (None: the model's default)

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits)


class Clean:
    """Standard training on clean images: the baseline adversarial training is compared against."""

    needs_attack = False
    attack_domain: str | None = None

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits, logits)


class Mixed:
    """100% adv + 100% clean in one batch: a J(clean) + (1 - a) J(adv) (Goodfellow et al.; Sec 6.3, a = 0.5)."""

    needs_attack = True
    attack_domain: str | None = None

    def __init__(self, clean_weight: float = 0.5, label_smoothing: float = 0.0):
        self.a, self.ls = clean_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().chunk(2)
        loss = self.a * F.cross_entropy(clean, y, label_smoothing=self.ls) + \
            (1 - self.a) * F.cross_entropy(adv, y, label_smoothing=self.ls)
        return StepOutput(loss, adv, clean)


class SplitBN:
    """Clean images through the clean BN domain and adversarial images through the adversarial (auxiliary) one, all
    other layers shared, in one forward pass over the concatenated batch; loss w_c J(clean) + w_a J(adv).

    - Mixture BN (Xie thesis Sec 6.4.2): 100% adv + 100% clean with separate BNs, w_c = a, w_a = 1 - a (a = 0.5);
      evaluate with either domain (MBN_clean or MBN_adv).
    - AdvProp (Xie thesis Sec 7.3, Algorithm 1): main BNs for clean images, auxiliary BNs for adversarial ones,
      loss L_clean + L_adv (w_c = w_a = 1); the auxiliary BNs are dropped at test time.
    The attack itself runs through the adversarial domain (``attack_domain``).
    """

    needs_attack = True
    attack_domain = "adv"

    def __init__(self, clean_weight: float, adv_weight: float, label_smoothing: float = 0.0):
        self.wc, self.wa, self.ls = clean_weight, adv_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        n = x.shape[0]
        with domain_split(("clean", n), ("adv", x_adv.shape[0])):
            logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().split([n, x_adv.shape[0]])
        loss = self.wc * F.cross_entropy(clean, y, label_smoothing=self.ls) + \
            self.wa * F.cross_entropy(adv, y, label_smoothing=self.ls)
        return StepOutput(loss, adv, clean)


SPLIT_BN_OBJECTIVES = ("mbn", "advprop")  # need model.bn_domains with 'clean' and 'adv'


def build_objective(cfg):
    if cfg.name == "madry":
        return Madry(cfg.label_smoothing)
    if cfg.name == "mixed":
        return Mixed(cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "mbn":
        return SplitBN(cfg.clean_weight, 1 - cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "advprop":
        return SplitBN(1.0, 1.0, cfg.label_smoothing)
    return Clean(cfg.label_smoothing)
