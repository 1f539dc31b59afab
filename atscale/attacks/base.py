"""The attack protocol: ``attack(model, x, y) -> x_adv`` with x in [0, 1], and the mode every attack runs in.

During an attack (Feature Denoising, Sec 4.5; DESIGN "Units and invariants"): BN layers use running statistics and
never update them (eval mode), and parameters do not require grad, so backward computes the input gradient only
(2 forward-equivalents per PGD step instead of 3) and no parameter ``.grad`` is touched. Layers that behave
differently for the attacker (``atscale.layers.context``) see ``in_attack()`` as True.

``SeededAttack`` is the shared state of every attack object in this package: budgets as fractions of the [0, 1] pixel
range, one seeded ``torch.Generator`` per attack (all randomness: starts, targets, transformations, square positions)
so that a run is reproducible from ``seed`` and from ``state_dict()``, and the ``perturb`` / ``__call__`` pair.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import nn

from atscale.attacks.losses import draw_targets
from atscale.layers.context import attack_pass


class Attack(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    target: torch.Tensor | None  # the class each targeted example was pushed towards
    success: torch.Tensor | None  # per example: fooled (untargeted) / hit the target (targeted), when tracked


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

    eps = step = 0.0

    def set_budget(self, eps: float, step: float) -> None:
        pass

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SeededAttack:
    """Base of the attack objects: ``name``, ``eps`` (fraction of [0, 1]), ``iters`` (steps or queries), ``targeted``,
    ``step`` (nominal step size as a fraction, 0 where the attack has none), ``seed`` and a lazily created generator on
    the input's device. ``reseed(seed)`` restarts the random stream; ``state_dict`` / ``load_state_dict`` carry it."""

    name: str = "attack"
    eps: float
    iters: int
    targeted: bool = False
    step: float = 0.0
    seed: int = 0
    amp_dtype: torch.dtype | None = None
    target_mode: str = "random"

    def _init_rng(self, seed: int) -> None:
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._gen.set_state(self._pending_state)
                self._pending_state = None
        return self._gen

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state()} if self._gen is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "gen" in state:
            self._pending_state = state["gen"]
            self._gen = None

    def set_budget(self, eps: float, step: float) -> None:
        """The budget of the next calls (fractions of [0, 1]); training's eps/step warmup sets it per step."""
        self.eps, self.step = eps, step

    def reseed(self, seed: int) -> None:
        self.seed, self._gen, self._pending_state = seed, None, None

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y).x_adv

    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return model(x).float()

    def _targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One target per example by ``target_mode``, from the clean logits."""
        with torch.no_grad():
            clean = self._logits(model, x)
        return draw_targets(clean, y, self.target_mode, g)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, eps={self.eps:.5g}, iters={self.iters}, "
                f"targeted={self.targeted}, seed={self.seed})")
