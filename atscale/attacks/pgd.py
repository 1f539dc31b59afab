"""L-inf projected gradient descent (Madry et al. 2018), as used for training and evaluation in Feature Denoising
(Xie thesis Sec 4.5) and Intriguing Properties (Sec 6.2).

Budgets here are fractions of the [0, 1] pixel range; configs give 0..255 units and ``build_attack`` converts once.
Targeted: the target is drawn uniformly over the K-1 wrong classes and the attack minimises its cross-entropy.
Start: uniform in the eps-ball, or the clean image with probability ``clean_start_prob`` (chosen per example, or once
per batch as the original IAT code did).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import attack_mode


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    target: torch.Tensor | None  # the class each targeted example was pushed towards
    success: torch.Tensor | None  # per example: fooled (untargeted) / hit the target (targeted), when tracked


class PGD:
    def __init__(self, eps: float, step: float, iters: int, targeted: bool = False, clean_start_prob: float = 0.0,
                 start_mode: str = "per_example", amp_dtype: torch.dtype | None = None, keep_best: bool = False,
                 seed: int = 0):
        if not 0 <= eps <= 1 or step <= 0 or iters < 1:
            raise ValueError(f"PGD needs 0 <= eps <= 1 (fraction of pixel range), step > 0, iters >= 1; got "
                             f"eps={eps}, step={step}, iters={iters}")
        self.eps, self.step, self.iters = eps, step, iters
        self.targeted = targeted
        self.clean_start_prob = clean_start_prob
        self.start_mode = start_mode
        self.amp_dtype = amp_dtype
        self.keep_best = keep_best
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._gen.set_state(self._pending_state)
                self._pending_state = None
        return self._gen

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state()} if self._gen is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "gen" in state:
            self._pending_state = state["gen"]
            self._gen = None

    def reseed(self, seed: int) -> None:
        self.seed, self._gen, self._pending_state = seed, None, None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y).x_adv

    def _start(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        noise = (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        if self.start_mode == "per_batch":
            clean = (torch.rand(1, generator=g, device=x.device) < self.clean_start_prob).expand(n)
        else:
            clean = torch.rand(n, generator=g, device=x.device) < self.clean_start_prob
        noise = torch.where(clean.view(-1, 1, 1, 1), torch.zeros_like(noise), noise)
        return (x + noise).clamp_(0, 1)

    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return model(x).float()

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

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        x = x.detach()
        g = self.generator(x.device)
        with attack_mode(model):
            x_adv = self._start(x, g)
            lo, hi = (x - self.eps).clamp_(min=0), (x + self.eps).clamp_(max=1)
            target = None
            best = level = None
            for i in range(self.iters + 1):
                last = i == self.iters
                if last and not self.keep_best:
                    break
                x_adv.requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    logits = self._logits(model, x_adv)
                if self.targeted and target is None:
                    k = logits.shape[1]
                    target = (y + torch.randint(1, k, y.shape, generator=g, device=y.device)) % k
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
                direction = -1.0 if self.targeted else 1.0
                x_adv = torch.min(torch.max(x_adv.detach() + direction * self.step * grad.sign(), lo), hi)
            success = None
            if self.keep_best:
                x_adv = torch.where((level > 0).view(-1, 1, 1, 1), best, x_adv.detach())
                success = level >= (2 if self.targeted else 1)
            return AttackResult(x_adv.detach(), target, success)
