"""Per-example attack objectives and target choices.

- margin: z_y - max_{j != y} z_j (negative = misclassified); Square attack's loss (Andriushchenko et al. 2020, Sec 3);
  ``cw_margin`` its C&W form clamped at -kappa, targeted or not (Carlini & Wagner 2017, f_6; CW-L2, STA, FWA).
- DLR (Croce & Hein 2020, "Reliable evaluation ...", Sec 4, Eq. 4): -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), with
  z_pi the logits sorted in decreasing order; shift- and scale-invariant in the logits.
- targeted DLR (Sec 4, Eq. 5): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
With fewer than 4 (3) classes the denominators fall back to z_pi1 - z_pi3 (to 1, a plain margin).

Targets: "random" uniform over the K-1 wrong classes (Feature Denoising, Sec 4.5), "least_likely" the class with the
lowest clean logit other than y (Kurakin et al.'s least-likely class, used by the adversarial-transformation defense),
and ``top_targets(logits, y, k)`` the k-th most likely wrong class (APGD-T / FAB-T run one per restart).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TARGET_MODES = ("random", "least_likely")
_DEN = 1e-12


def _others_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max_{j != cls} z_j per example."""
    mask = F.one_hot(cls, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y[:, None]).squeeze(1) - _others_max(logits, y)


def _sorted_desc(logits: torch.Tensor) -> torch.Tensor:
    return logits.sort(1, descending=True).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR (to maximize)."""
    k = logits.shape[1]
    s = _sorted_desc(logits)
    den = s[:, 0] - s[:, 2] if k >= 3 else torch.ones_like(s[:, 0])
    return -margin(logits, y) / (den + _DEN)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor, hit_target: bool = False) -> torch.Tensor:
    """Targeted DLR (to maximize). ``hit_target``: the numerator uses max_{j != t} z_j instead of z_y (the same while y
    is the top class), so its maximum has t as the top class rather than merely above y."""
    k = logits.shape[1]
    s = _sorted_desc(logits)
    if k >= 4:
        den = s[:, 0] - 0.5 * (s[:, 2] + s[:, 3])
    elif k == 3:
        den = s[:, 0] - s[:, 2]
    else:
        den = torch.ones_like(s[:, 0])
    z_t = logits.gather(1, t[:, None]).squeeze(1)
    ref = _others_max(logits, t) if hit_target else logits.gather(1, y[:, None]).squeeze(1)
    return -(ref - z_t) / (den + _DEN)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, kappa: float) -> torch.Tensor:
    """C&W's f (Carlini & Wagner 2017, f_6), to minimize: below 0 once the image is misclassified (hits the target)."""
    return (-margin(logits, target) if target is not None else margin(logits, y)).clamp(min=-kappa)


def fooled(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example: classified as ``target`` (targeted) or as anything but ``y`` (untargeted)."""
    pred = logits.argmax(1)
    return pred == target if target is not None else pred != y


def check_target_mode(mode: str) -> str:
    if mode not in TARGET_MODES:
        raise ValueError(f"target_mode must be one of {TARGET_MODES}; got {mode!r}")
    return mode


def random_targets(y: torch.Tensor, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Uniform over the K-1 wrong classes."""
    return (y + torch.randint(1, num_classes, y.shape, generator=g, device=y.device)) % num_classes


def least_likely_targets(clean_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin of the clean logits over the classes other than y."""
    mask = F.one_hot(y, clean_logits.shape[1]).bool()
    return clean_logits.masked_fill(mask, float("inf")).argmin(1)


def draw_targets(clean_logits: torch.Tensor, y: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """One target class per example by ``target_mode``: the clean least-likely class or a uniform wrong class."""
    if mode == "least_likely":
        return least_likely_targets(clean_logits, y)
    return random_targets(y, clean_logits.shape[1], g)


def top_targets(clean_logits: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th most likely class other than y (rank 1 = the runner-up of a correctly classified image)."""
    k = clean_logits.shape[1]
    if not 1 <= rank <= k - 1:
        raise ValueError(f"target rank must be in 1..{k - 1}; got {rank}")
    mask = F.one_hot(y, k).bool()
    order = clean_logits.masked_fill(mask, float("-inf")).argsort(1, descending=True)
    return order[:, rank - 1]
