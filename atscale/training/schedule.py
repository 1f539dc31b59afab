"""Per-step schedules as one function of the run's position: the learning rate (linear warmup, then step / cosine /
exponential / linear decay, :func:`atscale.training.optim.lr_factor`) and the attack budget's warmup (eps and step grow
linearly from 0 over ``attack.warmup_epochs``, as Kannan et al.'s ImageNet ALP and "fast" training). The loop applies
the plan explicitly (:meth:`atscale.training.run.Run.apply`); nothing here holds state.
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
    the attack's full budget (fractions)."""
    at = epoch + k / steps_per_epoch
    lr = peak_lr * lr_factor(epoch * steps_per_epoch + k, steps_per_epoch, cfg.schedule)
    f = budget_factor(at, cfg.attack.warmup_epochs)
    if cfg.attack.warmup_epochs > 0:
        eps, step = eps * f, max(step * f, 1e-12)
    return StepPlan(lr=lr, eps=eps, step=step, epoch=at)
