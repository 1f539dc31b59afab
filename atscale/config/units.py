"""Budget units, converted in this one place: configs, suites and the command line give ``eps`` and ``step`` in 0..255
pixel units (``eps: 16`` is 16/255, DESIGN.md); attacks work on [0, 1] images with fractions. Ranges are checked where
the value is read (:mod:`atscale.config.load` for configs, :class:`atscale.evaluation.suites.AttackSpec` for suite rows).
"""
from __future__ import annotations

PIXEL_LEVELS = 255.0

STEP_RULE = "max(step, eps / k)"


def to_fraction(pixels: float) -> float:
    """A budget in 0..255 pixel units -> a fraction of the [0, 1] range."""
    return float(pixels) / PIXEL_LEVELS


def to_pixels(fraction: float) -> float:
    """A fraction of the [0, 1] range -> 0..255 pixel units (for logs and reports)."""
    return float(fraction) * PIXEL_LEVELS


def pgd_step(eps: float, steps: int, step: float) -> float:
    """The one step rule of every PGD-k that atscale reports: max(step, eps / k), so k steps can always reach the
    boundary of the budget (Feature Denoising, Xie thesis Sec 4.5: eps 16, step 1, "the 10-step attack uses
    eps/10 = 1.6"); ``step`` 0 means eps / k. Any units, as long as eps and step share them."""
    return max(float(step), float(eps) / max(1, int(steps)))
