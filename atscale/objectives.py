"""Training objectives, one class per strategy (Xie thesis, Intriguing Properties of Adversarial Training, Sec 6.3).

Each objective has two parts that the engine calls per micro-batch:

- ``make_adv(model, attack, x, y)``: the inputs the loss needs beyond the clean batch, made with the unwrapped
  model (frozen parameters, eval-mode BN; ``atscale.attacks.base.attack_mode``). The default runs the training attack
  through the objective's ``attack_domain``.
- ``__call__(module, x, x_adv, y) -> StepOutput``: the loss through the (DDP / DeepSpeed) training module, whose
  backward the engine runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.layers.context import domain, domain_split


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # logits of the images the accuracy is reported on (adversarial when there are any)
    clean_logits: torch.Tensor | None = None


class Objective:
    """Base: ``needs_attack`` (False: the engine skips ``make_adv``), ``attack_domain`` (the BN domain the attack
    runs through; None = the model's default)."""

    needs_attack = True
    attack_domain: str | None = None

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor):
        with domain(self.attack_domain):
            return attack(model, x, y)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv, y: torch.Tensor) -> StepOutput:
        raise NotImplementedError


class Madry(Objective):
    """100% adversarial: minimise J(adv) only (Madry et al. 2018; the IAT recipe)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits)


class Clean(Objective):
    """Standard training on clean images: the baseline adversarial training is compared against."""

    needs_attack = False

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits.float(), y, label_smoothing=self.ls), logits, logits)


class Mixed(Objective):
    """100% adv + 100% clean in one batch: a J(clean) + (1 - a) J(adv) (Goodfellow et al.; Sec 6.3, a = 0.5)."""

    def __init__(self, clean_weight: float = 0.5, label_smoothing: float = 0.0):
        self.a, self.ls = clean_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().chunk(2)
        loss = self.a * F.cross_entropy(clean, y, label_smoothing=self.ls) + \
            (1 - self.a) * F.cross_entropy(adv, y, label_smoothing=self.ls)
        return StepOutput(loss, adv, clean)


class SplitBN(Objective):
    """Clean images through the clean BN domain and adversarial images through the adversarial (auxiliary) one, all
    other layers shared, in one forward pass over the concatenated batch; loss w_c J(clean) + w_a J(adv).

    - Mixture BN (Xie thesis Sec 6.4.2): 100% adv + 100% clean with separate BNs, w_c = a, w_a = 1 - a (a = 0.5);
      evaluate with either domain (MBN_clean or MBN_adv).
    - AdvProp (Xie thesis Sec 7.3, Algorithm 1): main BNs for clean images, auxiliary BNs for adversarial ones,
      loss L_clean + L_adv (w_c = w_a = 1); the auxiliary BNs are dropped at test time.
    The attack itself runs through the adversarial domain (``attack_domain``).
    """

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


class FineGrainedAdvProp(Objective):
    """Fine-grained AdvProp (Xie thesis Sec 7.5.4, Table 7.5): one main BN for clean images without AutoAugment and two
    auxiliary BNs, one for the AutoAugment images and one for adversarial examples; loss L_clean + L_aug + L_adv.

    The adversarial examples are crafted from the AutoAugment images (the thesis trains every network with AutoAugment
    by default, so those are its training images), through the ``adv`` BNs. ``augment`` maps a float [0, 1] batch to
    its AutoAugment version (``atscale.data.augment.AutoAugmentBatch``).
    """

    attack_domain = "adv"
    domains = ("clean", "aug", "adv")

    def __init__(self, augment, label_smoothing: float = 0.0):
        self.augment, self.ls = augment, label_smoothing

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor):
        x_aug = self.augment(x)
        with domain(self.attack_domain):
            return x_aug, attack(model, x_aug, y)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv, y: torch.Tensor) -> StepOutput:
        x_aug, x_adv = x_adv
        n = x.shape[0]
        with domain_split(("clean", n), ("aug", n), ("adv", n)):
            logits = model(torch.cat([x, x_aug, x_adv]))
        clean, aug, adv = logits.float().split(n)
        loss = sum(F.cross_entropy(z, y, label_smoothing=self.ls) for z in (clean, aug, adv))
        return StepOutput(loss, adv, clean)


SPLIT_BN_OBJECTIVES = {"mbn": ("clean", "adv"), "advprop": ("clean", "adv"),
                       "advprop_fg": FineGrainedAdvProp.domains}  # the model.bn_domains each one needs


def build_objective(cfg, augment=None):
    """The objective of ``objective.*``; ``augment`` is the AutoAugment batch transform (fine-grained AdvProp)."""
    if cfg.name == "advprop_fg":
        if augment is None:
            raise ValueError("objective advprop_fg needs the AutoAugment transform (data.autoaugment)")
        return FineGrainedAdvProp(augment, cfg.label_smoothing)
    if cfg.name == "madry":
        return Madry(cfg.label_smoothing)
    if cfg.name == "mixed":
        return Mixed(cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "mbn":
        return SplitBN(cfg.clean_weight, 1 - cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "advprop":
        return SplitBN(1.0, 1.0, cfg.label_smoothing)
    return Clean(cfg.label_smoothing)
