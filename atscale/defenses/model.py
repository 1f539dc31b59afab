"""The defended model: a pre-processor P in front of a classifier, one ``nn.Module`` on [0, 1] images.

``DefendedModel(x) = net(normalize(P(x)))``. It is a :class:`~atscale.models.normalize.NormalizedModel` whose
``net`` is the plain timm classifier, so everything that works on an atscale classifier works on it: ``model.init_from``
loads the target's weights into ``net``, export writes ``net`` as a folder plain timm loads, and every attack, training
or evaluation, differentiates through P and the classifier together (white-box = the full model; Zhou et al., JATP,
Sec 3.1 "full adversarial examples", Eq. 3-5).

``train`` names the part the optimizer updates; the other part's parameters get ``requires_grad = False`` and the
part stays in eval mode whatever ``model.train()`` asks (a fixed JATP target keeps its BN statistics; the adversarial
transformation's f_b is always fixed). Gradients with respect to the input still flow through a fixed part.
``spec`` records how the pre-processor was built, so an export can rebuild it (:mod:`atscale.defenses.export`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from atscale.models.normalize import NormalizedModel

__all__ = ["DefendedModel", "TRAIN_PARTS"]

TRAIN_PARTS = ("both", "preprocessor", "classifier")


class DefendedModel(NormalizedModel):
    def __init__(self, preprocessor: nn.Module, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 train: str = "both", spec: dict | None = None) -> None:
        if train not in TRAIN_PARTS:
            raise ValueError(f"train must be one of {TRAIN_PARTS}; got {train!r}")
        super().__init__(net, mean, std)
        self.preprocessor = preprocessor
        self.train_part = train
        self.spec = dict(spec or {})  # how to rebuild the pre-processor (atscale.defenses.build.build_preprocessor)
        for part in self.fixed_parts():
            part.requires_grad_(False)
        self.train(self.training)

    def fixed_parts(self) -> list[nn.Module]:
        """The parts the optimizer never updates (held in eval mode)."""
        return {"both": [], "preprocessor": [self.net], "classifier": [self.preprocessor]}[self.train_part]

    def train(self, mode: bool = True) -> "DefendedModel":
        super().train(mode)
        for part in self.fixed_parts():
            part.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(self.preprocessor(x)))

    def classifier_view(self) -> NormalizedModel:
        """The classifier alone, normalize -> net, sharing this model's weights: what *static* (oblivious)
        adversarial examples attack (Zhou et al., JATP Sec 2.2, Eq. 2)."""
        mean, std = self.normalize.mean.flatten().tolist(), self.normalize.std.flatten().tolist()
        return NormalizedModel(self.net, mean, std).to(self.normalize.mean.device)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """P(x): the pre-processed images the classifier sees."""
        return self.preprocessor(x)
