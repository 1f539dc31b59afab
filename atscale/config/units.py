"""Budget units, converted in this one place: configs, suites and the command line give ``eps`` and ``step`` in 0..255
pixel units (``eps: 16`` is 16/255, DESIGN.md); attacks work on [0, 1] images with fractions. Ranges are checked where
the value is read (:mod:`atscale.config.load` for configs, :class:`atscale.evaluation.suites.AttackSpec` for suite
rows). The threat models that are not balls of pixel values keep their own units (``OWN_UNITS``): a flow's largest
component in pixels (STA), a transport cost (FWA: mass in [0, 1] units x pixel distance).
"""
from __future__ import annotations

PIXEL_LEVELS = 255.0

STEP_RULE = "max(step, eps / k)"


OWN_UNITS = {"flow": "px", "wasserstein": "W1"}


def budget_fraction(eps: float, norm: str) -> float:
    """A suite row's ``eps`` as its attack takes it: a fraction for linf / l2, unchanged for ``OWN_UNITS`` norms."""
    return float(eps) if norm in OWN_UNITS else to_fraction(eps)


def budget_text(eps: float, norm: str = "linf") -> str:
    """``8/255``, or ``0.5 px`` / ``0.3 W1`` for the norms with their own units (reports)."""
    return f"{eps:.3g} {OWN_UNITS[norm]}" if norm in OWN_UNITS else f"{eps:.3g}/255"


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
