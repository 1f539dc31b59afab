"""FGSM with random start ("Fast is better than free", Wong et al. 2020): one signed-gradient step of size
alpha = 1.25 eps from a uniform start in the eps-ball, then projection. It is PGD with one iteration and no clean starts,
so it takes the same labels: [B] class indices, or [B, C] Mixup / CutMix soft targets when untargeted (the loss is the
cross-entropy against them; ``atscale.attacks.pgd``).
"""
from __future__ import annotations

import torch

from atscale.attacks.pgd import PGD


def fgsm_rs(eps: float, step: float | None = None, targeted: bool = False, amp_dtype: torch.dtype | None = None,
            seed: int = 0) -> PGD:
    return PGD(eps, step if step is not None else 1.25 * eps, 1, targeted=targeted, clean_start_prob=0.0,
               amp_dtype=amp_dtype, seed=seed)
