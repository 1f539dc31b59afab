"""Transfer (black-box) attacks from the family of fast gradient sign methods (Xie thesis, Chapter 3) and the tools to
evaluate with them.

- I-FGSM (Eq. 3.3): X_{n+1} = Clip_X^eps{X_n + alpha sign(grad L(X_n, y))}, X_0 = X (no random start).
- MI-FGSM (Eq. 3.4, Dong et al. 2018): g_{n+1} = mu g_n + grad / ||grad||_1 (per example), step along sign(g_{n+1});
  mu = 1.
- DI2-FGSM (Eq. 3.5-3.6, Sec 3.3.3): with probability p (0.5) per iteration the attacker's forward pass sees T(X_n): a
  nearest-neighbour resize to rnd x rnd, rnd uniform in [H, H * 330/299), then zero padding at a random offset to
  H * 330/299 (299 -> [299, 330) and 330 at ImageNet scale; the ratio scales the range so 32 px images work too).
- M-DI2-FGSM (Eq. 3.7): both. TI-FGSM (Dong et al. 2019, translation-invariant): the gradient is convolved with a
  Gaussian kernel (size ``kernel_size``, sigma = (size - 1) / 6, i.e. +-3 sigma across the kernel) before use.
- Defaults (Sec 3.4.1): step alpha = 1/255, N = min(eps + 4, 1.25 eps) iterations with eps in pixel units.
- ``LogitEnsemble`` (Eq. 3.8): l(X) = sum_k w_k l_k(X), w_k >= 0, sum_k w_k = 1 (Sec 3.3.5).
- ``transfer_eval``: accuracy on a target model of the examples crafted on a source model or ensemble.
- ``all_or_nothing`` (Sec 4.6.2, the CAAD 2018 criterion): an image is correct only if every attacker's version of it
  is classified correctly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.losses import check_target_mode

__all__ = ["TransferFGSM", "LogitEnsemble", "TransferResult", "AllOrNothingResult", "transfer_eval",
           "all_or_nothing", "all_or_nothing_eval", "default_transfer_iters", "gaussian_kernel", "input_diversity"]

DI_RATIO = 330 / 299


def default_transfer_iters(eps: float) -> int:
    """N = min(eps + 4, 1.25 eps) with eps in 0..255 pixel units (Kurakin et al.; thesis Sec 3.4.1), at least 1."""
    e = eps * 255.0
    return max(1, int(math.floor(min(e + 4, 1.25 * e) + 1e-6)))


def gaussian_kernel(size: int, nsig: float = 3.0) -> torch.Tensor:
    """size x size Gaussian spanning +-nsig standard deviations, normalised to sum 1 (TI-FGSM's smoothing kernel)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1; got {size}")
    if size == 1:
        return torch.ones(1, 1)
    t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    k1 = torch.exp(-0.5 * t ** 2)
    k = torch.outer(k1, k1)
    return (k / k.sum()).float()


def default_kernel_size(height: int) -> int:
    """15 at 299 px (Dong et al. 2019), scaled with the image side, odd, at least 5."""
    k = max(5, int(round(15 * height / 299)))
    return k if k % 2 else k + 1


def input_diversity(x: torch.Tensor, g: torch.Generator, ratio: float = DI_RATIO) -> torch.Tensor:
    """T(X) of DI2-FGSM: nearest resize to rnd in [H, out), out = floor(H * ratio) (>= H + 1), and random zero padding
    to out x out (W scaled alike). Differentiable in X; one random size and offset per call (per iteration)."""
    _, _, h, w = x.shape
    out_h, out_w = max(h + 1, int(h * ratio)), max(w + 1, int(w * ratio))
    rnd_h = int(torch.randint(h, out_h, (1,), generator=g, device=g.device).item())
    rnd_w = min(out_w - 1, max(w, int(round(rnd_h * w / h))))
    resized = F.interpolate(x, size=(rnd_h, rnd_w), mode="nearest")
    top = int(torch.randint(0, out_h - rnd_h + 1, (1,), generator=g, device=g.device).item())
    left = int(torch.randint(0, out_w - rnd_w + 1, (1,), generator=g, device=g.device).item())
    return F.pad(resized, (left, out_w - rnd_w - left, top, out_h - rnd_h - top))


class TransferFGSM(SeededAttack):
    """The iterative FGSM family of Fig 3.2: ``momentum`` mu (0 = I-FGSM, 1 = MI-FGSM), ``diversity_prob`` p (0 = no
    input diversity, 0.5 = DI2-FGSM), ``kernel_size`` for TI (0 = off, None = scaled default). Linf only.

    ``iters=None`` uses N = min(eps + 4, 1.25 eps) (pixel units); ``step`` defaults to 1/255. Targeted: minimise the
    target's cross-entropy (``target_mode`` random / least_likely); success = target hit, else misclassified (the
    success flags refer to the model the examples were crafted on). ``resize_back``: resize the diverse input back to
    H x W (bilinear) for models that need a fixed input size."""

    def __init__(self, eps: float, step: float | None = None, iters: int | None = None, *, momentum: float = 0.0,
                 diversity_prob: float = 0.0, diversity_ratio: float = DI_RATIO, kernel_size: int | None = 0,
                 targeted: bool = False, target_mode: str = "random", resize_back: bool = False,
                 name: str = "i-fgsm", norm: str = "linf", seed: int = 0, amp_dtype: torch.dtype | None = None):
        if norm != "linf":
            raise ValueError("the FGSM transfer family is implemented for norm='linf' only")
        if not 0 < eps <= 1 or not 0 <= diversity_prob <= 1 or momentum < 0 or diversity_ratio <= 1:
            raise ValueError(f"need 0 < eps <= 1, 0 <= diversity_prob <= 1, momentum >= 0, diversity_ratio > 1; got "
                             f"eps={eps}, diversity_prob={diversity_prob}, momentum={momentum}, "
                             f"diversity_ratio={diversity_ratio}")
        self.eps = eps
        self.step = step if step is not None else 1 / 255
        self.iters = iters if iters else default_transfer_iters(eps)
        if self.step <= 0 or self.iters < 1:
            raise ValueError(f"need step > 0 and iters >= 1; got step={self.step}, iters={self.iters}")
        self.momentum, self.diversity_prob, self.diversity_ratio = momentum, diversity_prob, diversity_ratio
        self.kernel_size = kernel_size
        self.targeted = targeted
        self.target_mode = check_target_mode(target_mode)
        self.resize_back = resize_back
        self.name, self.norm = name, norm
        self.amp_dtype = amp_dtype
        self._init_rng(seed)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        size = default_kernel_size(x.shape[-2]) if self.kernel_size is None else self.kernel_size
        if not size or size <= 1:
            return None
        return gaussian_kernel(size).to(x.device, x.dtype).expand(x.shape[1], 1, size, size).contiguous()

    def _view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The input the network sees this iteration: T(x; p) of Eq. 3.6."""
        if self.diversity_prob <= 0:
            return x
        if float(torch.rand(1, generator=g, device=g.device).item()) >= self.diversity_prob:
            return x
        out = input_diversity(x, g, self.diversity_ratio)
        if self.resize_back:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        x = x.detach()
        g = self.generator(x.device)
        kernel = self._kernel(x)
        with attack_mode(model):
            t = None
            if self.targeted:
                t = target if target is not None else self._targets(model, x, y, g)
            lo, hi = (x - self.eps).clamp(min=0), (x + self.eps).clamp(max=1)
            x_adv = x.clone()
            acc = torch.zeros_like(x)
            for _ in range(self.iters):
                xg = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = self._logits(model, self._view(xg, g))
                    loss = F.cross_entropy(logits, t if self.targeted else y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xg)
                if self.targeted:
                    grad = -grad
                if kernel is not None:
                    grad = F.conv2d(grad, kernel, padding=kernel.shape[-1] // 2, groups=x.shape[1])
                if self.momentum > 0:
                    l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    acc = self.momentum * acc + grad / l1
                    grad = acc
                x_adv = torch.min(torch.max(x_adv + self.step * grad.sign(), lo), hi).detach()
            with torch.no_grad():
                pred = self._logits(model, x_adv).argmax(1)
        success = pred == t if self.targeted else pred != y
        return AttackResult(x_adv, t, success)


class LogitEnsemble(nn.Module):
    """l(X) = sum_k w_k l_k(X) (thesis Eq. 3.8); weights default to uniform and must be >= 0 and sum to 1."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if len(models) == 0:
            raise ValueError("LogitEnsemble needs at least one model")
        w = torch.full((len(models),), 1.0 / len(models)) if weights is None else torch.tensor(
            [float(v) for v in weights])
        if w.numel() != len(models) or bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"ensemble weights must be {len(models)} non-negative numbers summing to 1; got "
                             f"{w.tolist()}")
        self.models = nn.ModuleList(models)
        self.register_buffer("weights", w, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for wk, m in zip(self.weights.tolist(), self.models):
            z = wk * m(x)
            out = z if out is None else out + z
        return out


@dataclass
class TransferResult:
    acc: float  # target model's accuracy on the examples crafted on the source
    correct: torch.Tensor  # per image bool, on the target
    source_acc: float  # the source's own (white-box) accuracy on them
    clean_acc: float  # target model's clean accuracy
    x_adv: torch.Tensor

    def __float__(self) -> float:
        return self.acc


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model(x).argmax(1)
    finally:
        for m, t in modes:
            m.training = t


def transfer_eval(source: nn.Module, target: nn.Module, attack: SeededAttack, x: torch.Tensor,
                  y: torch.Tensor) -> TransferResult:
    """Craft adversarial examples on ``source`` (a model or a ``LogitEnsemble``) and classify them with ``target``."""
    with torch.enable_grad():
        x_adv = attack.perturb(source, x, y).x_adv
    correct = _predict(target, x_adv) == y
    return TransferResult(acc=correct.float().mean().item(), correct=correct,
                          source_acc=(_predict(source, x_adv) == y).float().mean().item(),
                          clean_acc=(_predict(target, x) == y).float().mean().item(), x_adv=x_adv)


def all_or_nothing(correct: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per image: correct under every attacker (Sec 4.6.2)."""
    masks = list(correct.values()) if isinstance(correct, Mapping) else list(correct)
    if not masks:
        raise ValueError("all_or_nothing needs at least one attacker's result")
    return torch.stack([m.bool() for m in masks]).all(0)


@dataclass
class AllOrNothingResult:
    acc: float  # all-or-nothing accuracy
    correct: torch.Tensor  # per image bool
    per_attacker: dict[str, float]  # each attacker's transfer accuracy alone


def all_or_nothing_eval(target: nn.Module, attackers: Mapping[str, tuple[nn.Module, SeededAttack]],
                        x: torch.Tensor, y: torch.Tensor) -> AllOrNothingResult:
    """Black-box evaluation of ``target`` against several attackers, each a (source model, attack) pair."""
    results = {name: transfer_eval(src, target, atk, x, y) for name, (src, atk) in attackers.items()}
    correct = all_or_nothing({k: r.correct for k, r in results.items()})
    return AllOrNothingResult(acc=correct.float().mean().item(), correct=correct,
                              per_attacker={k: r.acc for k, r in results.items()})
