"""Projected gradient descent (Madry et al. 2018), as used for training and evaluation in Feature Denoising
(Xie thesis Sec 4.5) and Intriguing Properties (Sec 6.2).

Budgets here are fractions of the [0, 1] pixel range; configs give 0..255 units and ``build_attack`` converts once.
- ``norm="linf"`` (default): signed-gradient steps, clamp to the eps-box; ``norm="l2"``: steps along grad / ||grad||_2,
  projection onto the L2 ball, random start uniform in the ball.
- Targeted: the attack minimises the target's cross-entropy; ``target_mode="random"`` (default) draws the target
  uniformly over the K-1 wrong classes, ``"least_likely"`` takes the clean logits' argmin over the classes other than y.
- Start: uniform in the eps-ball, or the clean image with probability ``clean_start_prob`` (chosen per example, or once
  per batch as the original IAT code did).
- ``keep_best``: return each example's first iterate of the highest level reached (correct < misclassified < target).
- ``restarts=R``: R runs from fresh random starts with the same targets; later runs attack only the examples not yet
  successful; each example keeps the first successful run, else the run with the highest loss at its returned point.
- Soft labels: ``y`` may be [B, C] float soft targets (Mixup / CutMix training with ``attack.mixup_labels=soft``,
  ARES 2.0 robust_training, Liu et al. 2023); the untargeted attack then ascends the cross-entropy against them.
  Everything defined by a class index (targets, ``keep_best`` levels, restart success) needs [B] class indices.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.geometry import check_norm, direction, project, random_in_ball
from atscale.attacks.losses import check_target_mode, least_likely_targets, random_targets

__all__ = ["PGD", "AttackResult", "signed_ascent"]


def signed_ascent(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: torch.Tensor, eps: float,
                  step: float, iters: int) -> torch.Tensor:
    """L-inf PGD on any per-example objective: ``iters`` steps ``z <- proj(z + step * sign(grad sum(loss_fn(z))))``
    from ``start``, projected on the eps-ball around ``x`` and [0, 1]. For losses other than the classification ones of
    :class:`PGD` (TRADES' KL, Zhang et al. 2019; JATP's feature distance, Zhou et al. Eq. 5). The caller holds the
    model in :func:`atscale.attacks.base.attack_mode`."""
    z = start.detach()
    for _ in range(iters):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(z).sum(), z)
        z = project(z.detach() + step * grad.sign(), x, eps, "linf")
    return z.detach()


class PGD(SeededAttack):
    name = "pgd"

    def __init__(self, eps: float, step: float, iters: int, targeted: bool = False, clean_start_prob: float = 0.0,
                 start_mode: str = "per_example", amp_dtype: torch.dtype | None = None, keep_best: bool = False,
                 seed: int = 0, *, norm: str = "linf", restarts: int = 1, target_mode: str = "random"):
        check_norm(norm)
        if eps < 0 or (norm == "linf" and eps > 1) or step <= 0 or iters < 1 or restarts < 1:
            raise ValueError(f"PGD needs 0 <= eps (<= 1 for linf; a fraction of the pixel range), step > 0, "
                             f"iters >= 1, restarts >= 1; got eps={eps}, step={step}, iters={iters}, "
                             f"restarts={restarts}")
        if start_mode not in ("per_example", "per_batch"):
            raise ValueError(f"start_mode must be 'per_example' or 'per_batch'; got {start_mode!r}")
        self.eps, self.step, self.iters = eps, step, iters
        self.targeted = targeted
        self.clean_start_prob = clean_start_prob
        self.start_mode = start_mode
        self.amp_dtype = amp_dtype
        self.keep_best = keep_best
        self.norm = norm
        self.restarts = restarts
        self.target_mode = check_target_mode(target_mode)
        self._init_rng(seed)

    def _start(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        noise = random_in_ball(x, self.eps, self.norm, g)
        if self.start_mode == "per_batch":
            clean = (torch.rand(1, generator=g, device=x.device) < self.clean_start_prob).expand(n)
        else:
            clean = torch.rand(n, generator=g, device=x.device) < self.clean_start_prob
        noise = torch.where(clean.view(-1, 1, 1, 1), torch.zeros_like(noise), noise)
        return (x + noise).clamp_(0, 1)

    def _check_soft(self, x: torch.Tensor, y: torch.Tensor) -> None:
        uses = [name for name, on in (("targeted", self.targeted), ("keep_best", self.keep_best),
                                      ("restarts > 1", self.restarts > 1)) if on]
        if uses:
            raise ValueError(f"PGD got soft labels (float {tuple(y.shape)}), but {', '.join(uses)} needs class "
                             "indices; pass the hard labels (soft.argmax(1); attack.mixup_labels=hard in training)")
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(f"PGD soft labels must be [B, C] for a batch of {x.shape[0]}; got {tuple(y.shape)}")

    @staticmethod
    def _level(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """2 = classified as the target, 1 = misclassified, 0 = correct. Evaluation keeps each example's first iterate
        of the highest level reached, so accuracy (level >= 1 at any iterate) cannot rise with more steps and targeted
        success (level 2 at any iterate) cannot fall."""
        pred = logits.argmax(1)
        lv = (pred != y).to(torch.int8)
        if target is not None:
            lv = lv + (pred == target).to(torch.int8)
        return lv

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Per-example objective being maximised: CE(y), or -CE(target) when targeted."""
        if self.targeted:
            return -F.cross_entropy(logits, target, reduction="none")
        return F.cross_entropy(logits, y, reduction="none")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        """``target`` (optional, targeted only) overrides the target choice; ``y``: [B] class indices, or [B, C] soft
        targets for the plain untargeted attack (see the module docstring)."""
        x = x.detach()
        if y.is_floating_point():
            self._check_soft(x, y)
        g = self.generator(x.device)
        with attack_mode(model), torch.enable_grad():
            if self.targeted and target is None and self.target_mode == "least_likely":
                with torch.no_grad():
                    target = least_likely_targets(self._logits(model, x), y)
            stats = self.restarts > 1
            x_adv, target, success, loss = self._run(model, x, y, target, g, stats)
            for _ in range(self.restarts - 1):
                todo = (~success).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                xa, _, s, lo = self._run(model, x[todo], y[todo], None if target is None else target[todo], g, True)
                take = s | (lo > loss[todo])
                idx = todo[take]
                x_adv[idx], success[idx], loss[idx] = xa[take], s[take], lo[take]
            return AttackResult(x_adv.detach(), target, success)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             g: torch.Generator, stats: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                      torch.Tensor | None]:
        """One run from a fresh start: (x_adv, target, success, loss at x_adv); success / loss None unless tracked."""
        x_adv = self._start(x, g)
        lo, hi = (x - self.eps).clamp(min=0), (x + self.eps).clamp(max=1)
        best = level = None
        track = self.keep_best or stats
        logits = None
        for i in range(self.iters + 1):
            last = i == self.iters
            if last and not track:
                break
            x_adv.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = self._logits(model, x_adv)
            if self.targeted and target is None:
                k = logits.shape[1]
                target = random_targets(y, k, g)
            if self.keep_best:
                lv = self._level(logits.detach(), y, target)
                if best is None:
                    best, level = x_adv.detach().clone(), lv
                else:
                    better = lv > level
                    best[better] = x_adv.detach()[better]
                    level = torch.maximum(level, lv)
            if last:
                break
            loss = F.cross_entropy(logits, target if self.targeted else y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            sign = -1.0 if self.targeted else 1.0
            if self.norm == "linf":
                x_adv = torch.min(torch.max(x_adv.detach() + sign * self.step * grad.sign(), lo), hi)
            else:
                x_adv = project(x_adv.detach() + sign * self.step * direction(grad, "l2"), x, self.eps, "l2")
        x_adv = x_adv.detach()
        success = loss = None
        if self.keep_best:
            x_adv = torch.where((level > 0).view(-1, 1, 1, 1), best, x_adv)
            success = level >= (2 if self.targeted else 1)
        if stats:
            loss = self._loss(logits.detach(), y, target)  # at the last iterate, which is x_adv where level == 0
            if success is None:
                success = self._level(logits.detach(), y, target) >= (2 if self.targeted else 1)
        return x_adv, target, success, loss
