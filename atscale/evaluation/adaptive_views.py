"""What an adaptive attack row differentiates (``AttackSpec.through``; Athalye, Carlini & Wagner 2018), for
pre-processing defenses (:class:`atscale.defenses.model.DefendedModel`; JATP Sec 4 and Fig. 4a, Xiao & Zheng Sec 4):

- ``""``: the model as it is: for a defended model, the full pipeline T(P(x)) with P's true gradients;
- ``"bpda"``: BPDA with the identity: the forward pass runs P, the backward pass treats P as the identity (the
  papers' BPDA / BPDA-I). For the adversarial transformation this equals the plain model, whose g already
  back-propagates as the identity;
- ``"bpda-smooth"`` (adversarial transformation only): the backward pass follows g's smooth approximation (tanh for
  sign, straight-through projection; :meth:`atscale.defenses.transform.AdversarialTransform.smooth`);
- ``"eot<N>"``: EOT over N draws of a randomized model (the adversarial transformation's random starts): the attack
  follows the mean of N forward passes per step (``atscale.attacks.adaptive.EOT``);
- ``"bpda+eot<N>"``: both.

The attack's result is always scored on the model itself, one forward per image, so each row is scored by the same
rule as every other row; only the gradients the attack follows differ.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from atscale.attacks.adaptive import BPDA, EOT
from atscale.defenses.model import DefendedModel
from atscale.defenses.transform import AdversarialTransform
from atscale.errors import ConfigError

__all__ = ["THROUGH_PATTERN", "adaptive_view", "check_through"]

THROUGH_PATTERN = re.compile(r"^(bpda(?:-smooth)?)?(\+?eot(\d+))?$")


def check_through(through: str, label: str) -> None:
    m = THROUGH_PATTERN.match(through)
    if not m or (m.group(2) and int(m.group(3)) < 1) or (m.group(2) and m.group(1) and not m.group(2).startswith("+")) \
            or (m.group(2) and not m.group(1) and m.group(2).startswith("+")):
        raise ConfigError(f"suite attack {label!r}: through = {through!r} is not '', 'bpda', 'bpda-smooth', "
                          "'eot<N>' or 'bpda+eot<N>'", "e.g. through: eot8")


class _BPDAView(nn.Module):
    """T(BPDA(P)(x)): P in the forward pass; in the backward pass the identity, or (``smooth``) the Jacobian of the
    adversarial transformation's smooth approximation with the random start of the same call."""

    def __init__(self, model: DefendedModel, smooth: bool = False) -> None:
        super().__init__()
        self.model, self.smooth = model, smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.model.preprocessor
        if self.smooth:
            call = int(pre.calls)
            purify = BPDA(pre, lambda z: pre.smooth(z, call))
        else:
            purify = BPDA(pre, "identity")
        return self.model.net(self.model.normalize(purify(x)))


def adaptive_view(model: nn.Module, through: str) -> nn.Module:
    """The module an attack row with ``through`` differentiates (module docstring)."""
    if not through:
        return model
    m = THROUGH_PATTERN.match(through)
    view = model
    if m.group(1):
        if not isinstance(model, DefendedModel):
            raise ConfigError(f"an attack row through '{through}' needs a pre-processing defense (BPDA replaces the "
                              f"pre-processor's gradient), but the model is a plain {type(model).__name__}",
                              "drop the bpda rows or evaluate a run with defense.preprocessor")
        smooth = m.group(1) == "bpda-smooth"
        if smooth and not isinstance(model.preprocessor, AdversarialTransform):
            raise ConfigError(f"through '{through}' needs the adversarial transformation (its smooth approximation); "
                              f"this pre-processor is a {type(model.preprocessor).__name__} with exact gradients",
                              "use through: bpda or no through")
        view = _BPDAView(model, smooth)
    if m.group(2):
        view = EOT(view, samples=int(m.group(3)))
    return view
