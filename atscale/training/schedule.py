"""Per-step schedules as one function of the run's position: the learning rate (linear warmup, then step / cosine /
exponential / linear decay, :func:`atscale.training.optim.lr_factor`) and the attack budget's warmup over
``attack.warmup_epochs``: ``attack.warmup = eps_and_step`` grows eps and step together linearly from 0 (Kannan et al.'s
ImageNet ALP and "fast" training), ``step`` keeps eps at its full value and grows only the step from 0 (ARES 2.0
robust_training, Liu et al. 2023: PGD-3 at 4/255 with step 8/(3 x 255) ramped over the first 5 epochs). The loop
applies the plan explicitly (:meth:`atscale.training.run.Run.apply`); nothing here holds state.

The lr is a function of the fractional epoch (``epoch + k / steps_per_epoch``), so it stays continuous across
``data.phases`` whose batch sizes (hence steps per epoch) differ; what changes at a phase boundary is the peak lr,
which follows the phase's global batch (linear scaling, :meth:`atscale.training.run.Run.peak_lr`).
"""
from __future__ import annotations

from dataclasses import dataclass

from atscale.config import Config
from atscale.training.optim import lr_factor


@dataclass(frozen=True)
class StepPlan:
    """What optimizer step ``k`` of an epoch runs with: ``lr``, the attack's ``eps`` and ``step`` (fractions of [0, 1])
    and the fractional ``epoch`` it falls at."""

    lr: float
    eps: float
    step: float
    epoch: float


def budget_factor(epoch: float, warmup_epochs: float) -> float:
    """min(1, epoch / warmup_epochs); 1 without warmup."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, max(0.0, epoch) / warmup_epochs)


def plan_at(cfg: Config, epoch: int, k: int, steps_per_epoch: int, peak_lr: float, eps: float,
            step: float) -> StepPlan:
    """The plan of optimizer step ``k`` (0-based) of ``epoch`` with ``steps_per_epoch`` steps; ``eps`` / ``step`` are
    the attack's full budget (fractions) in the current phase. Under warmup the step never reaches 0 (PGD needs a
    positive step): its floor is 1e-12."""
    at = epoch + k / steps_per_epoch
    lr = peak_lr * lr_factor(epoch * steps_per_epoch + k, steps_per_epoch, cfg.schedule)
    if cfg.attack.warmup_epochs > 0:
        f = budget_factor(at, cfg.attack.warmup_epochs)
        if cfg.attack.warmup != "step":
            eps = eps * f
        step = max(step * f, 1e-12)
    return StepPlan(lr=lr, eps=eps, step=step, epoch=at)
