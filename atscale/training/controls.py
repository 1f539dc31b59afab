"""Training controls from the papers and their peers, each a small object that ``train.main`` drives per step or per
epoch:

- ``EarlyStopping``: robust overfitting (Rice et al. 2020): watch the robust accuracy of the periodic validation checks,
  keep the best weights (``best.pt``), stop after ``patience`` checks without improvement.
- ``WeightEMA``: an exponential moving average of the weights and BN buffers (timm's ``ModelEmaV3``), evaluated and
  exported instead of the raw weights.
- ``phase_at``: the training phase of an epoch: progressive resizing ("fast" training, Wong et al. 2020) or AdvXL's
  coarse-to-fine stages (Wang et al. 2024, Sec 3: a long stage at low resolution / with dropped tokens and a weak
  attack, then a short one at full resolution with a stronger attack). ``check_phases`` refuses phases the model or
  the attack cannot follow; ``patch_dropouts`` finds the timm ``PatchDropout`` modules whose prob ``token_drop`` sets.
BN train/test consistency (Xie thesis Sec 6.4.3) is ``atscale.training.loop.freeze_bn_statistics``; the attack
budget's warmup is ``atscale.training.schedule``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from atscale.attacks import NoAttack
from atscale.config import Config
from atscale.config.units import to_fraction
from atscale.errors import ConfigError


class EarlyStopping:
    """Best-so-far tracking of a validation metric (higher is better) with patience counted in checks."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("-inf")
        self.best_step = -1
        self.bad = 0

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """(improved, stop): improved when ``value`` beats the best; stop when patience checks in a row did not."""
        if value > self.best:
            self.best, self.best_step, self.bad = value, step, 0
            return True, False
        self.bad += 1
        return False, self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", float("-inf"))
        self.best_step, self.bad = state.get("best_step", -1), state.get("bad", 0)


class WeightEMA:
    """EMA of ``model``'s parameters and buffers: ema <- decay * ema + (1 - decay) * weights after every optimizer
    step (timm ``ModelEmaV3``; BN running statistics are averaged too). ``module`` is a full model to evaluate."""

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay)
        self.decay = decay

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(model, step=step)

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state)


class PhaseSettings(NamedTuple):
    """One phase of ``data.phases`` at an epoch: its index, image size and per-process batch size (the run's when the
    phase leaves them unset) and its attack / token settings (None: the run's ``attack.*`` / the model as built;
    budgets in 0..255 pixel units as in the config)."""

    index: int
    image_size: int
    batch_size: int
    attack_iters: int | None = None
    attack_eps: float | None = None
    attack_step: float | None = None
    token_drop: float | None = None


def phase_at(epoch: int, phases: list[dict[str, Any]], image_size: int, batch_size: int) -> PhaseSettings:
    """The phase holding ``epoch`` (each holds until its ``until_epoch``, exclusive); one phase of the base sizes when
    none is given."""
    for i, ph in enumerate(phases):
        if epoch < ph["until_epoch"]:
            return PhaseSettings(i, ph.get("image_size", image_size), ph.get("batch_size", batch_size),
                                 ph.get("attack_iters"), ph.get("attack_eps"), ph.get("attack_step"),
                                 ph.get("token_drop"))
    return PhaseSettings(0, image_size, batch_size)


def phase_overrides(cfg: Config, ph: PhaseSettings) -> dict[str, Any]:
    """A phase's attack and token settings as :class:`atscale.training.run.Phase` keeps them: budgets as fractions
    (None = the run's); ``attack_iters`` / ``token_drop`` resolved to the phase's or the run's value when any phase sets
    them (the run's token drop is ``model.kwargs.patch_drop_rate``), None when none does (left alone)."""
    def sets(key: str) -> bool:
        return any(key in p for p in cfg.data.phases)

    base_drop = float(cfg.model.kwargs.get("patch_drop_rate", 0.0))
    return {"attack_iters": (ph.attack_iters or cfg.attack.iters) if sets("attack_iters") else None,
            "attack_eps": None if ph.attack_eps is None else to_fraction(ph.attack_eps),
            "attack_step": None if ph.attack_step is None else to_fraction(ph.attack_step),
            "token_drop": (base_drop if ph.token_drop is None else ph.token_drop) if sets("token_drop") else None}


def patch_dropouts(model: nn.Module) -> list[nn.Module]:
    """The timm ``PatchDropout`` modules of ``model`` (a ViT built with ``patch_drop_rate`` > 0 has one)."""
    from timm.layers import PatchDropout
    from timm.layers.patch_dropout import PatchDropoutWithIndices

    return [m for m in model.modules() if isinstance(m, (PatchDropout, PatchDropoutWithIndices))]


def _check_sizes(phases: list[dict[str, Any]], model: nn.Module) -> None:
    """A phase image size a strict timm patch embedding cannot take (a ViT built without ``dynamic_img_size``)."""
    from timm.layers import PatchEmbed

    for m in model.modules():
        if not isinstance(m, PatchEmbed) or m.img_size is None:
            continue
        for i, ph in enumerate(phases):
            size = ph.get("image_size")
            if size is None:
                continue
            if m.strict_img_size and (size, size) != tuple(m.img_size):
                raise ConfigError(f"data.phases[{i}].image_size = {size}, but the model's patch embedding takes only "
                                  f"{tuple(m.img_size)} images (a timm ViT built without dynamic_img_size)",
                                  "build the ViT with model.kwargs.dynamic_img_size=true (position embeddings are "
                                  "then interpolated to each phase's grid), or drop image_size from the phase")
            if not m.dynamic_img_pad and any(size % p for p in m.patch_size):
                raise ConfigError(f"data.phases[{i}].image_size = {size} is not a multiple of the patch size "
                                  f"{tuple(m.patch_size)}", "use a multiple of the patch size, or build the ViT "
                                  "with model.kwargs.dynamic_img_pad=true")


def check_phase_batches(phases: list[dict[str, Any]], images: int, accum: int) -> None:
    """Refuse a phase whose batch (x gradient accumulation) exceeds the ``images`` of this rank: it would have no
    optimizer step."""
    for i, ph in enumerate(phases):
        if ph.get("batch_size", 0) * accum > images:
            raise ConfigError(f"data.phases[{i}].batch_size = {ph['batch_size']} x dist.grad_accum = {accum} exceeds "
                              f"the {images} training images of this rank", "lower the phase's batch_size or "
                              "dist.grad_accum")


def check_phases(phases: list[dict[str, Any]], model: nn.Module, attack_name: str, attack: Any) -> None:
    """Refuse ``data.phases`` settings the run cannot follow, before its first step: ``token_drop`` without a timm
    ``PatchDropout`` in the model, an ``image_size`` a strict ViT patch embedding cannot take, attack settings on a
    run without an attack, ``attack_iters`` on the one-step FGSM, ``attack_step`` on APGD (whose step adapts)."""
    _check_sizes(phases, model)
    for i, ph in enumerate(phases):
        if ph.get("token_drop") is not None and not patch_dropouts(model):
            raise ConfigError(f"data.phases[{i}].token_drop = {ph['token_drop']}, but the model has no timm "
                              "PatchDropout module to set", "build the ViT with model.kwargs.patch_drop_rate > 0 "
                              "(e.g. 0.1; the phases then set its rate), or drop token_drop from the phases")
        keys = [k for k in ("attack_iters", "attack_eps", "attack_step") if k in ph]
        if keys and isinstance(attack, NoAttack):
            raise ConfigError(f"data.phases[{i}] sets {', '.join(keys)}, but the run has no attack "
                              f"(attack.name = {attack_name!r}, or attack.eps = 0)",
                              "set attack.name (pgd or apgd) and attack.eps > 0, or drop the phase's attack keys")
        if "attack_iters" in ph and attack_name == "fgsm":
            raise ConfigError(f"data.phases[{i}].attack_iters with attack.name = 'fgsm' (one step by definition)",
                              "use attack.name = pgd for phases with several steps, or drop attack_iters")
        if "attack_step" in ph and attack_name == "apgd":
            raise ConfigError(f"data.phases[{i}].attack_step with attack.name = 'apgd': APGD's step starts at "
                              "2 eps and adapts itself, so it takes no step size", "drop attack_step from the phases")
