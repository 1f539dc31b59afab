"""Wasserstein adversarial examples by Frank-Wolfe, FWA (Wu, Wang & Yu 2020, "Stronger and Faster Wasserstein
Adversarial Attacks", Sec 4, Algorithm 2), the ARN paper's unseen spatially-constrained attack (Zhou et al. 2021,
Table 2: FWA_N).

Each channel's pixel values are mass moved by a local transport plan P: P[o, i] is the mass pixel i sends to the pixel
at offset o within a ``kernel_size`` window (Wong et al. 2019's local transport), so x' = sum_o shift_o(P[o]) keeps the
total mass, and the cost sum P[o, i] * ||o||_2 (pixel distances, summed over channels) is the Wasserstein distance
bound, at most ``eps``. Frank-Wolfe keeps P feasible: from the identity plan, P <- P + eta_t (S - P), eta_t =
2 / (t + 2), with S the linear maximization oracle of the loss gradient over the plans of cost <= eps, regularized by
entropy (the paper's choice): S[o, i] = x_i softmax_o((G[o, i] - lambda ||o||) / gamma), G the gradient scaled to
max |G| = 1 per image, lambda >= 0 bisected per image so the cost meets eps. Untargeted ascends CE(y), targeted
descends CE(target). The image is clipped to [0, 1] after transport (clipping only removes mass). The returned image
is the first adversarial iterate, otherwise the last one; both lie in the Wasserstein ball.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.losses import check_target_mode, fooled


@dataclass
class PlanResult(AttackResult):
    cost: torch.Tensor | None = None  # per example: the transport cost of the returned image's plan (<= eps)


def _offsets_cost(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """||o||_2 of each window offset, in unfold's order (row-major over the k x k window)."""
    r = torch.arange(k, device=device, dtype=dtype) - k // 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return (dy.pow(2) + dx.pow(2)).sqrt().flatten()


def transport(plan: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
    """The image a plan (N, C, K, H, W) delivers: each pixel receives the mass sent to it."""
    n, c, kk, h, w = plan.shape
    return F.fold(plan.reshape(n, c * kk, h * w), size, k, padding=k // 2)


def _valid(k: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(K, H, W): True where offset o from pixel i lands inside the image."""
    ones = torch.ones(1, 1, h, w, device=device, dtype=dtype)
    return F.unfold(ones, k, padding=k // 2).reshape(k * k, h, w) > 0


class FWA(SeededAttack):
    """FWA with a Wasserstein budget ``eps`` (transport cost: mass in [0, 1] pixel units x pixel distance)."""

    name = "fwa"

    def __init__(self, eps: float, iters: int = 50, *, kernel_size: int = 5, entropy: float = 1e-2,
                 bisections: int = 20, targeted: bool = False, target_mode: str = "random", seed: int = 0,
                 amp_dtype: torch.dtype | None = None):
        if eps <= 0 or iters < 1 or kernel_size < 3 or kernel_size % 2 == 0 or entropy <= 0:
            raise ValueError(f"fwa needs eps > 0 (a transport cost), iters >= 1, an odd kernel_size >= 3 and entropy "
                             f"> 0; got eps={eps}, iters={iters}, kernel_size={kernel_size}, entropy={entropy}")
        self.eps, self.iters, self.k, self.gamma, self.bisections = eps, iters, kernel_size, entropy, bisections
        self.targeted, self.target_mode, self.amp_dtype = targeted, check_target_mode(target_mode), amp_dtype
        self._init_rng(seed)

    def lmo(self, grad: torch.Tensor, x: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The entropic linear maximization oracle: the plan of cost <= eps best aligned with ``grad`` (N, C, K, H,
        W), lambda bisected per image."""
        n = grad.shape[0]
        scale = grad.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
        g = (grad / scale).masked_fill(~valid, float("-inf"))
        c = cost.view(1, 1, -1, 1, 1)
        mass = x.unsqueeze(2)

        g, c = g / self.gamma, c / self.gamma

        def plan(lam: torch.Tensor) -> torch.Tensor:
            return mass * torch.softmax(g - lam.view(-1, 1, 1, 1, 1) * c, dim=2)

        def spent(lam: torch.Tensor) -> torch.Tensor:
            return (plan(lam) * c).flatten(1).sum(1) * self.gamma

        lo = torch.zeros(n, device=x.device, dtype=x.dtype)
        hi = torch.full_like(lo, 4.0)
        for _ in range(20):
            over = spent(hi) > self.eps
            if not over.any():
                break
            hi = torch.where(over, hi * 2, hi)
        for _ in range(self.bisections):
            mid = (lo + hi) / 2
            over = spent(mid) > self.eps
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
        lam = torch.where(spent(lo) <= self.eps, lo, hi)
        return plan(lam)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PlanResult:
        x = x.detach()
        n, ch, h, w = x.shape
        g = self.generator(x.device)
        cost = _offsets_cost(self.k, x.device, x.dtype)
        valid = _valid(self.k, h, w, x.device, torch.float32)[None, None]
        with attack_mode(model), torch.enable_grad():
            target = self._targets(model, x, y, g) if self.targeted else None
            plan = torch.zeros(n, ch, self.k * self.k, h, w, device=x.device, dtype=x.dtype)
            plan[:, :, self.k * self.k // 2] = x
            best, success = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
            best_cost = torch.zeros(n, device=x.device, dtype=x.dtype)
            for t in range(self.iters + 1):
                delivered = transport(plan, self.k, (h, w))
                xa = delivered.clamp(0, 1).requires_grad_(True)
                logits = self._logits(model, xa)
                with torch.no_grad():
                    hit = fooled(logits, y, target)
                    new = hit & ~success
                    best[new], success = xa.detach()[new], success | hit
                    best_cost[new] = self.plan_cost(plan, self.k, cost)[new]
                if t == self.iters or bool(success.all()):
                    break
                ce = F.cross_entropy(logits, target if target is not None else y, reduction="sum")
                (grad,) = torch.autograd.grad(-ce if target is not None else ce, xa)
                with torch.no_grad():
                    # d loss / d P[o, i] = the image gradient at i + o (fold's adjoint is unfold); clipped pixels: 0
                    inside = (delivered - xa).abs() < 1e-12
                    grad = F.unfold(grad * inside, self.k, padding=self.k // 2).view_as(plan)
                    s = self.lmo(grad, x, cost, valid)
                    plan = plan + 2.0 / (t + 2) * (s - plan)
            x_adv = torch.where(success.view(-1, 1, 1, 1), best, xa.detach())
            spent = torch.where(success, best_cost, self.plan_cost(plan, self.k, cost))
        return PlanResult(x_adv.detach(), target, success, spent)

    @staticmethod
    def plan_cost(plan: torch.Tensor, k: int, cost: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example transport cost of a plan (N, C, K, H, W); ``cost``: the offsets' distances, when at hand."""
        cost = _offsets_cost(k, plan.device, plan.dtype) if cost is None else cost
        return (plan * cost.view(1, 1, -1, 1, 1)).flatten(1).sum(1)


__all__ = ["FWA", "PlanResult", "transport"]
