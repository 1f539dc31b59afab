"""Adaptive-attack wrappers for pre-processing defenses (Athalye, Carlini & Wagner 2018, "Obfuscated gradients give a
false sense of security"): BPDA for non-differentiable front ends and EOT for randomized ones. Both are nn.Modules,
so any attack in this package runs through them unchanged, e.g. ``PGD(...)(nn.Sequential(BPDA(Quantize(4)), net), x,
y)`` or ``APGD(...)(EOT(nn.Sequential(RandomResizePad(), net), samples=16), x, y)``.

- BPDA (Backward Pass Differentiable Approximation, Sec 4.1): the forward pass runs the real pre-processing p(x); the
  backward pass replaces dp/dx by the Jacobian of a differentiable approximation g ~ p (``backward=g``), or by the
  identity (``backward="identity"``, for p(x) ~ x such as denoisers, quantisation, JPEG).
- EOT (Expectation over Transformation, Sec 4.3): the forward pass averages the wrapped randomized module's outputs over
  ``samples`` independent draws (``reduce="logits"``, or log-probabilities with ``reduce="log_softmax"``). The
  backward pass then averages the draws' Jacobians: for any loss linear in the output (the target logit, or the NLL of
  the averaged log-probabilities) the gradient is exactly the mean of the per-draw gradients, and for the usual
  cross-entropy / margin losses it is the per-draw Jacobians averaged at the loss gradient of the averaged output;
  either way the estimate's variance over the draws falls as 1 / samples.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BPDA", "EOT", "Quantize"]


class _BPDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_fn: Callable[[torch.Tensor], torch.Tensor],
                backward_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        ctx.backward_fn = backward_fn
        ctx.save_for_backward(x)
        with torch.no_grad():
            out = forward_fn(x)
        if backward_fn is None and out.shape != x.shape:
            raise ValueError(f"BPDA backward='identity' needs an output of the input's shape; got {tuple(out.shape)} "
                             f"from {tuple(x.shape)}")
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.backward_fn is None:
            return grad_out, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            approx = ctx.backward_fn(xd)
            (grad_in,) = torch.autograd.grad(approx, xd, grad_out)
        return grad_in, None, None


class BPDA(nn.Module):
    """Forward: ``preprocess(x)``; backward: identity or the vector-Jacobian product of ``backward(x)``."""

    def __init__(self, preprocess: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 backward: str | Callable[[torch.Tensor], torch.Tensor] = "identity"):
        super().__init__()
        if isinstance(backward, str) and backward != "identity":
            raise ValueError(f"BPDA backward must be 'identity' or a differentiable callable; got {backward!r}")
        self.preprocess = preprocess
        self.approx = None if isinstance(backward, str) else backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.preprocess(x)
        return _BPDAFunction.apply(x, self.preprocess, self.approx)


class EOT(nn.Module):
    """Mean of ``module(x)`` over ``samples`` draws of its randomness (module = random front end + classifier)."""

    def __init__(self, module: nn.Module, samples: int = 8, reduce: str = "logits"):
        super().__init__()
        if samples < 1:
            raise ValueError(f"EOT samples must be >= 1; got {samples}")
        if reduce not in ("logits", "log_softmax"):
            raise ValueError(f"EOT reduce must be 'logits' or 'log_softmax'; got {reduce!r}")
        self.module, self.samples, self.reduce = module, samples, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for _ in range(self.samples):
            z = self.module(x)
            if self.reduce == "log_softmax":
                z = torch.log_softmax(z.float(), dim=1)
            out = z if out is None else out + z
        return out / self.samples


class Quantize(nn.Module):
    """Round pixels in [0, 1] to ``levels`` evenly spaced values: a non-differentiable front end (its autograd
    gradient is zero almost everywhere), the textbook case for BPDA with the identity."""

    def __init__(self, levels: int = 4):
        super().__init__()
        if levels < 2:
            raise ValueError(f"Quantize needs levels >= 2; got {levels}")
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.levels - 1
        return torch.round(x.clamp(0, 1) * k) / k
