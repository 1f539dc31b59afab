"""The attack protocol: ``attack(model, x, y) -> x_adv`` with x in [0, 1], and the mode every attack runs in.

During an attack (Feature Denoising, Sec 4.5; DESIGN "Units and invariants"): BN layers use running statistics and
never update them (eval mode), and parameters do not require grad, so backward computes the input gradient only
(2 forward-equivalents per PGD step instead of 3) and no parameter ``.grad`` is touched. Layers that behave
differently for the attacker (``atscale.layers.context``) see ``in_attack()`` as True.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch
from torch import nn

from atscale.layers.context import attack_pass


class Attack(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration of an attack; both restored exactly afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with attack_pass():
            yield model
    finally:
        for m, t in modes:
            m.training = t
        for p, r in flags:
            p.requires_grad_(r)


class NoAttack:
    """Identity attack, for clean (standard) training."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
