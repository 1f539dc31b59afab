"""What every training objective shares (:mod:`atscale.training.objectives` and
:mod:`atscale.training.preprocessor_objectives`): the ``Objective`` interface the engine calls, its ``StepOutput``,
and the cross-entropies (plain / soft targets, and MART's boosted one)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.layers.context import domain

__all__ = ["Objective", "StepOutput", "cross_entropy", "boosted_cross_entropy", "unwrapped"]


def unwrapped(module: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed training module (the module itself when not wrapped)."""
    return getattr(module, "module", module)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against class indices (smoothed by ``label_smoothing``, Szegedy et al. 2016) or against
    [B, C] soft targets, which carry their smoothing already (timm's ``Mixup`` builds them smoothed; smoothing
    them again here would apply it twice)."""
    if y.is_floating_point():
        if y.shape != logits.shape:
            raise ValueError(f"soft targets of shape {tuple(y.shape)} for logits of shape {tuple(logits.shape)}")
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


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

    replays = 1  # optimizer steps per micro-batch ("free" training replays each minibatch m times)

    def after_backward(self) -> None:
        """Called after each backward (free training reads the input gradient here)."""

    def bind(self, model: nn.Module) -> None:
        """Check the objective fits the built (unwrapped) model before any step; raise ValueError otherwise."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def boosted_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's boosted cross-entropy, batch mean of -log p_y - log(1 - max_{k != y} p_k) (Wang et al. 2020, Eq. 4;
    JATP Eq. 7)."""
    wrong = F.softmax(logits, 1).scatter(1, y[:, None], float("-inf")).amax(1)
    return F.cross_entropy(logits, y) - torch.log((1.0 - wrong).clamp_min(1e-12)).mean()
