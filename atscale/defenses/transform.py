"""The adversarial transformation g(x) of Xiao & Zheng, "One Man's Trash is Another Man's Treasure: Resisting
Adversarial Examples by Adversarial Examples" (CVPR 2020, ``xiao-zheng-2020-adversarial-transformation-defense``).

Sec 3.2, Eq. 2-3: g(x) is a least-likely targeted L-inf PGD on a fixed, pre-trained model f_b: the target is the class
f_b finds least likely for x, the start is uniform in [-delta, delta] around x, and ``iters`` (13) steps of size
``step`` (delta / 6) descend f_b's cross-entropy towards it, projected on the delta-ball and [0, 1]. The paper uses
delta = 0.2 on [0, 1] pixels, a large range on purpose (Sec 3.3). The classifier f_a is trained on g(x) and predicts
f_a(g(x)); g runs inside the defended model in training and at inference (Sec 3.2, Fig. 1).

The steps are :class:`atscale.attacks.pgd.PGD`'s own (one PGD in atscale). Each call draws its random start from a
generator seeded by ``seed`` and the call count, a buffer of the module, so checkpoints carry it and a resumed run
draws what an unbroken one would.

Gradients: the output is ``g(x) + (x - x.detach())`` (the value of g(x) exactly), so autograd passes the identity through g. That *is* the
paper's BPDA-I attack (Sec 4.1: the backward pass of g approximated by the identity); g's true gradient is zero almost
everywhere (its steps are signs), which a plain gradient attack would mistake for robustness. Any attack on the
defended model therefore differentiates f_a(g(x)) with g's backward = identity, and EOT over g's random start is a
matter of repeating calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.geometry import project, random_in_ball
from atscale.attacks.pgd import PGD

__all__ = ["AdversarialTransform"]


class AdversarialTransform(nn.Module):
    """g(x) on the fixed f_b ``base`` (a normalized classifier on [0, 1] images); ``delta`` / ``step`` are fractions
    of the pixel range."""

    def __init__(self, base: nn.Module, delta: float, iters: int, step: float, seed: int = 0) -> None:
        super().__init__()
        if not 0 < delta <= 1 or iters < 1 or step <= 0:
            raise ValueError(f"the adversarial transformation needs 0 < delta <= 1, iters >= 1, step > 0; got "
                             f"delta={delta}, iters={iters}, step={step}")
        self.base = base.requires_grad_(False).eval()
        self.delta, self.iters, self.step, self.seed = delta, iters, step, seed
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "AdversarialTransform":
        super().train(mode)
        self.base.eval()
        return self

    def transform(self, x: torch.Tensor, call: int | None = None) -> torch.Tensor:
        """g(x) as a new tensor (no graph), drawn with the stream of call number ``call`` (default: the next call)."""
        call = int(self.calls) if call is None else call
        pgd = PGD(eps=self.delta, step=self.step, iters=self.iters, targeted=True, seed=self.seed * 1_000_003 + call)
        x = x.detach()
        with torch.no_grad():
            target = self.base(x).argmin(1)
        return pgd.perturb(self.base, x, target, target=target).x_adv

    def smooth(self, x: torch.Tensor, call: int, sharpness: float = 10.0) -> torch.Tensor:
        """A differentiable approximation of g for BPDA (Athalye et al. 2018 Sec 4.1; Xiao & Zheng Sec 4.1 attack g
        through smooth approximations): the same random start and unrolled steps, with ``tanh(sharpness * grad / s)`` in
        place of ``sign(grad)`` (s: the image's mean absolute gradient, so ``sharpness`` is scale-free), the gradients kept through every step (``create_graph``), and the projection on the
        delta-box and [0, 1] passed straight through in the backward pass."""
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + call)
        with torch.no_grad():
            target = self.base(x).argmin(1)
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            z = x + random_in_ball(x, self.delta, "linf", gen)
            z = z + (z.clamp(0, 1) - z).detach()
            for _ in range(self.iters):
                loss = F.cross_entropy(self.base(z), target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, z, create_graph=True)
                scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                z = z - self.step * torch.tanh(sharpness * grad / scale)
                z = z + (project(z, x, self.delta, "linf") - z).detach()
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.transform(x)
        self.calls += 1
        return g + (x - x.detach())

    def extra_repr(self) -> str:
        return f"delta={self.delta:.4g}, iters={self.iters}, step={self.step:.4g}, seed={self.seed}"
