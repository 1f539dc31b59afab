"""Training controls from the papers and their peers, each a small object that ``train.main`` drives per step or per
epoch:

- ``EarlyStopping``: robust overfitting (Rice et al. 2020): watch the robust accuracy of the periodic validation checks,
  keep the best weights (``best.pt``), stop after ``patience`` checks without improvement.
- ``WeightEMA``: an exponential moving average of the weights and BN buffers (timm's ``ModelEmaV3``), evaluated and
  exported instead of the raw weights.
- ``phase_at``: the progressive-resizing phase (image size, batch size) of an epoch ("fast" training, Wong et al.).
BN train/test consistency (Xie thesis Sec 6.4.3) is ``atscale.training.loop.freeze_bn_statistics``; the attack
budget's warmup is ``atscale.training.schedule``.
"""
from __future__ import annotations

from typing import Any

from torch import nn


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


def phase_at(epoch: int, phases: list[dict[str, Any]], image_size: int, batch_size: int) -> tuple[int, int, int]:
    """(phase index, image size, per-process batch size) of ``epoch``; one phase of the base sizes when none given."""
    for i, ph in enumerate(phases):
        if epoch < ph["until_epoch"]:
            return i, ph.get("image_size", image_size), ph.get("batch_size", batch_size)
    return 0, image_size, batch_size
