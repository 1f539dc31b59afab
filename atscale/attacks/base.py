"""The attack protocol: ``attack(model, x, y) -> x_adv`` with x in [0, 1], and the mode every attack runs in.

During an attack (Feature Denoising, Sec 4.5; DESIGN "Units and invariants"): BN layers use running statistics and
never update them (eval mode), and parameters do not require grad, so backward computes the input gradient only
(2 forward-equivalents per PGD step instead of 3) and no parameter ``.grad`` is touched. Layers that behave
differently for the attacker (``atscale.layers.context``) see ``in_attack()`` as True. Dropout-like layers are off
unless a run asks for them in its training attack (``attack.stochastic_layers``; ``attack_mode`` lists every layer
kind).

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
from atscale.layers.context import attack_pass, stochastic_attack


class Attack(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    target: torch.Tensor | None  # the class each targeted example was pushed towards
    success: torch.Tensor | None  # per example: fooled (untargeted) / hit the target (targeted), when tracked


def _stochastic_layer_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    from timm.layers import DropBlock2d, DropPath, PatchDropout
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    return (nn.modules.dropout._DropoutNd, DropPath, PatchDropout, DropBlock2d), (ResNet, EfficientNet)


def _draws_in_training(m: nn.Module, types: tuple[tuple[type, ...], tuple[type, ...]]) -> bool:
    """A module whose own ``training`` flag only switches random draws: dropout-like layers; attention modules whose
    fused kernel reads their flag for the attention dropout (timm: ``dropout_p = attn_drop.p if self.training else
    0``); timm ResNet / EfficientNet, whose head dropout is ``F.dropout(x, drop_rate, training=self.training)`` (their
    own flag switches nothing else; their BNs are separate modules and stay in eval mode)."""
    layers, head_dropout_nets = types
    return (isinstance(m, layers) or isinstance(getattr(m, "attn_drop", None), nn.modules.dropout._DropoutNd)
            or isinstance(getattr(m, "attn_drop_p", None), float)
            or (isinstance(m, head_dropout_nets) and float(getattr(m, "drop_rate", 0.0)) > 0))


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """What every layer kind does in the attacker's passes (Feature Denoising Sec 4.5; Singh et al. 2023 Sec 3), all
    restored exactly on exit:

    - parameters: ``requires_grad`` False (input gradients only, no ``.grad`` touched), the flags restored on exit;
      LayerScale / ``gamma`` (ConvNeXt, DeiT-III, XCiT's eta) is one more frozen parameter multiply;
    - BatchNorm (incl. Mixture BN, timm ``BatchNormAct2d``): eval mode, normalizes with the running statistics and
      never updates them (``num_batches_tracked`` too);
    - LayerNorm / GroupNorm / RMSNorm: no statistics to keep; the same function as in the optimizer's passes;
    - Dropout (any ``_DropoutNd``, attention dropout, timm ResNet / EfficientNet head dropout), timm ``DropPath``,
      ``PatchDropout``, ``DropBlock2d``: off (the deterministic network, eval mode) by default; with
      ``attack.stochastic_layers`` (``atscale.layers.context.set_stochastic_attack(True)``) those that were in
      training mode on entry draw as in training, from torch's global RNG (the attack's own generator is untouched),
      while BN stays in eval mode. Evaluation attacks (inside ``context.evaluation()``) and models entered in eval
      mode always see them off;
    - every other module: eval mode; the ``training`` flags of all modules are restored on exit.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    if stochastic_attack():
        types = _stochastic_layer_types()
        for m, was_training in modes:
            if was_training and _draws_in_training(m, types):
                m.training = True
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
