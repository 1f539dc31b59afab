"""Divergence guards (the run stops with ``TrainingDiverged`` and never saves broken weights): a non-finite training
loss stops the loop at once (fp16: after a run of them, which its loss scaler skips), and no checkpoint is written
whose weights or BN running statistics hold a NaN or inf, so the last good checkpoint stays the newest.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from atscale.errors import TrainingDiverged

_DIVERGED_FIX = ("lower optim.lr, lengthen schedule.warmup_epochs or attack.warmup_epochs, lower attack.step, or "
                 "train in bf16 (run.amp) rather than fp16, then start again or resume from the last checkpoint")

# fp16 runs use dynamic loss scaling, which skips a step whose loss or gradients overflow and lowers the scale; a few
# such steps in a row are normal there. Without it, the first non-finite loss has already reached the weights.
FP16_NONFINITE_STEPS = 20


def nonfinite_state(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers (BN running statistics too) holding a NaN or inf; one device sync when all
    are finite."""
    tensors = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point() and t.numel()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return []
    return [n for n, t in tensors if not bool(torch.isfinite(t).all())]


def refuse_nonfinite_state(module: nn.Module, step: int) -> None:
    """The guard in front of a checkpoint write: raise ``TrainingDiverged`` rather than save NaN/inf weights or BN
    statistics, so the last good checkpoint stays the newest."""
    bad = nonfinite_state(module)
    if bad:
        raise TrainingDiverged(f"training diverged: {len(bad)} weight or BN-statistics tensors hold NaN or inf at step "
                               f"{step} (first: {bad[0]}); not saving them", _DIVERGED_FIX)


class DivergenceGuard:
    """Counts non-finite losses in a row; raises after the first (fp16: after ``FP16_NONFINITE_STEPS``)."""

    def __init__(self, amp_dtype: torch.dtype | None):
        self.tolerated = FP16_NONFINITE_STEPS if amp_dtype == torch.float16 else 0
        self.in_a_row = 0

    def check(self, loss: float, step: int, batch: int) -> None:
        self.in_a_row = 0 if math.isfinite(loss) else self.in_a_row + 1
        if self.in_a_row > self.tolerated:
            row = f", {self.in_a_row} non-finite steps in a row" if self.tolerated else ""
            raise TrainingDiverged(f"training diverged: loss {loss} at step {step} (batch {batch} of the epoch{row}); "
                                   "nothing after the last checkpoint was saved", _DIVERGED_FIX)


__all__ = ["DivergenceGuard", "nonfinite_state", "refuse_nonfinite_state", "FP16_NONFINITE_STEPS"]
