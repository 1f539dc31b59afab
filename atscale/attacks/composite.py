"""A sequence of attacks in the AutoAttack spirit (Croce & Hein 2020, "Reliable evaluation ...", Sec 5): the
"standard" ensemble runs APGD-CE, APGD-T, FAB-T and Square in this order, each only on the images that every earlier
attack left correctly classified (and never on images misclassified without attack). An image counts as robust only if
it survives all of them; the result records which attack broke each image. Every attack's output is re-checked with
one forward pass and must lie inside the threat model (norm <= eps) to count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.geometry import lp_norm

__all__ = ["Composite", "CompositeResult"]


@dataclass
class CompositeResult(AttackResult):
    broken_by: list[str | None] = field(default_factory=list)  # per image: "clean", an attack's name, or None (robust)
    clean_correct: torch.Tensor | None = None  # per image bool
    robust_after: dict[str, int] = field(default_factory=dict)  # images still correct after each attack (cumulative)
    attacked: dict[str, int] = field(default_factory=dict)  # images each attack was run on


class Composite(SeededAttack):
    """Runs ``attacks`` in order on the still-correct images. ``targeted`` is False: success = misclassified."""

    name = "standard"

    def __init__(self, attacks: Sequence[SeededAttack], *, name: str = "standard", norm: str = "linf",
                 iters: int | None = None, seed: int = 0, amp_dtype: torch.dtype | None = None):
        if not attacks:
            raise ValueError("Composite needs at least one attack")
        names = [a.name for a in attacks]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must be unique inside a composite; got {names}")
        if any(a.targeted for a in attacks):
            raise ValueError("a composite evaluates robust accuracy: its attacks must count success as "
                             "misclassification (targeted=False)")
        self.attacks = list(attacks)
        self.name, self.norm = name, norm
        self.eps = max(a.eps for a in attacks)
        self.iters = iters if iters is not None else max(a.iters for a in attacks)
        self.step = 0.0
        self.targeted = False
        self.amp_dtype = amp_dtype
        self._init_rng(seed)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        for i, a in enumerate(self.attacks):
            a.reseed(seed + i)

    def state_dict(self) -> dict:
        return {a.name: a.state_dict() for a in self.attacks}

    def load_state_dict(self, state: dict) -> None:
        for a in self.attacks:
            if a.name in state:
                a.load_state_dict(state[a.name])

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> CompositeResult:
        x = x.detach()
        with attack_mode(model):
            with torch.no_grad():
                robust = self._logits(model, x).argmax(1) == y
            clean_correct = robust.clone()
            x_adv = x.clone()
            broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
            robust_after, attacked = {}, {}
            for atk in self.attacks:
                idx = robust.nonzero().squeeze(1)
                attacked[atk.name] = idx.numel()
                if idx.numel() > 0:
                    res = atk.perturb(model, x[idx], y[idx])
                    xa = res.x_adv.detach()
                    with torch.no_grad():
                        fooled = self._logits(model, xa).argmax(1) != y[idx]
                    inside = lp_norm(xa - x[idx], self.norm) <= atk.eps * (1 + 1e-5) + 1e-7
                    inside &= (xa >= 0).flatten(1).all(1) & (xa <= 1).flatten(1).all(1)
                    fooled &= inside
                    hit = idx[fooled]
                    x_adv[hit] = xa[fooled]
                    robust[hit] = False
                    for i in hit.tolist():
                        broken_by[i] = atk.name
                robust_after[atk.name] = int(robust.sum())
        return CompositeResult(x_adv, None, ~robust, broken_by=broken_by, clean_correct=clean_correct,
                               robust_after=robust_after, attacked=attacked)
