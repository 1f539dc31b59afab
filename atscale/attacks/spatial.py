"""Spatially transformed adversarial examples, STA (Xiao et al. 2018, "Spatially Transformed Adversarial Examples",
Sec 3, Eq. 2-4), one of the ARN paper's unseen spatially-constrained attacks (Zhou et al. 2021, Table 2: STA_N, STA_T).

Every output pixel p samples the input bilinearly at p + f_p, with a per-pixel flow f = (du, dv) in pixels. The attack
minimizes L_adv + tau * L_flow: L_adv is the C&W margin max(Z_y - max_{j != y} Z_j, -kappa) (targeted: max(max_{j != t}
Z_j - Z_t, -kappa)) and L_flow = sum_p sum_{q in N(p)} sqrt(||du_p - du_q||^2 + ||dv_p - dv_q||^2 + 1e-8) over the 4
neighbours, the smoothness that keeps the warp natural (the paper: tau = 0.05). The paper optimizes the unbounded flow
with L-BFGS; here Adam runs ``iters`` steps from the zero flow, projected to ``|f| <= eps`` pixels per component, so
the attack has a budget an accuracy can be stated at. Like C&W's search over its constant (and advertorch's STA, which
the ARN paper ran), tau is per example: it drops tenfold at each quarter of the iterations while the example is not
yet fooled (measured on the digits test model, flow <= 1 px: tau fixed at 0.05 left 84% accuracy, 0.005 left 0%). The
returned image is the adversarial iterate with the smallest L_flow, otherwise the last iterate (its flow inside the
budget). Borders replicate the edge pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.losses import check_target_mode, cw_margin, fooled


@dataclass
class FlowResult(AttackResult):
    flow: torch.Tensor | None = None  # (N, 2, H, W) in pixels: x_adv = warp(x, flow)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) sampled bilinearly at each pixel plus ``flow`` (N, 2, H, W; (du, dv) = (x, y) in pixels)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=x.device, dtype=x.dtype)
    grid = torch.stack((gx, gy), -1)[None] + flow.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flow_loss(flow: torch.Tensor) -> torch.Tensor:
    """Per-example L_flow (Xiao et al. 2018, Eq. 4): each pixel's distance to its 4 neighbours' flow, each pair
    counted from both sides."""
    pad = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    h, w = flow.shape[-2:]
    total = torch.zeros(flow.shape[0], device=flow.device, dtype=flow.dtype)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff = flow - pad[..., dy:dy + h, dx:dx + w]
        total = total + (diff.pow(2).sum(1) + 1e-8).sqrt().flatten(1).sum(1)
    return total


class STA(SeededAttack):
    """STA with a flow budget ``eps`` in pixels (see the module docstring); ``lr``: Adam's step in pixels."""

    name = "sta"

    def __init__(self, eps: float, iters: int = 100, *, tau: float = 0.05, lr: float = 0.0, kappa: float = 0.0,
                 targeted: bool = False, target_mode: str = "random", seed: int = 0,
                 amp_dtype: torch.dtype | None = None):
        if eps <= 0 or iters < 1 or tau < 0:
            raise ValueError(f"sta needs eps > 0 (the largest flow component, in pixels), iters >= 1, tau >= 0; got "
                             f"eps={eps}, iters={iters}, tau={tau}")
        self.eps, self.iters, self.tau, self.kappa, self.targeted = eps, iters, tau, kappa, targeted
        self.step = lr or eps / 10
        self.target_mode, self.amp_dtype = check_target_mode(target_mode), amp_dtype
        self._init_rng(seed)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FlowResult:
        x = x.detach()
        n, _, h, w = x.shape
        g = self.generator(x.device)
        with attack_mode(model), torch.enable_grad():
            target = self._targets(model, x, y, g) if self.targeted else None
            flow = torch.zeros((n, 2, h, w), device=x.device, dtype=x.dtype, requires_grad=True)
            opt = torch.optim.Adam([flow], lr=self.step)
            best, best_flow = x.clone(), torch.zeros_like(flow)
            tau = torch.full((n,), self.tau, device=x.device, dtype=x.dtype)
            best_smooth = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
            for i in range(self.iters + 1):
                xa = warp(x, flow)
                logits = self._logits(model, xa)
                smooth = flow_loss(flow)
                with torch.no_grad():
                    better = fooled(logits, y, target) & (smooth < best_smooth)
                    best[better], best_smooth[better] = xa.detach()[better], smooth.detach()[better]
                    best_flow[better] = flow.detach()[better]
                if i == self.iters:
                    break
                if i and i % max(1, self.iters // 4) == 0:  # not fooled yet: smoothness weighs 10x less
                    tau = torch.where(best_smooth < float("inf"), tau, tau / 10)
                loss = (cw_margin(logits, y, target, self.kappa) + tau * smooth).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    flow.clamp_(-self.eps, self.eps)
            success = best_smooth < float("inf")
            keep = success.view(-1, 1, 1, 1)
            x_adv, flow = torch.where(keep, best, xa.detach()), torch.where(keep, best_flow, flow.detach())
        return FlowResult(x_adv, target, success, flow)


__all__ = ["FlowResult", "STA", "flow_loss", "warp"]
