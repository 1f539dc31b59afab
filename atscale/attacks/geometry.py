"""Threat-model geometry shared by the attacks: the Linf / L2 balls intersected with the [0, 1] pixel box.

Random starts (uniform in the ball), projections (Linf: exact, a clamp; L2: onto the ball, then clipped to the box, the
usual approximation of the projection onto the intersection) and the steepest-ascent direction of each norm (Linf: the
gradient's sign; L2: the gradient over its L2 norm), as in Madry et al. 2018 and Croce & Hein 2020 (APGD).
"""
from __future__ import annotations

import torch

NORMS = ("linf", "l2")
_TINY = 1e-12


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    return norm


def _per_example(v: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (v.dim() - 1)


def lp_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of a batch ``v`` (N, ...)."""
    flat = v.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit step of steepest ascent for the norm: sign (Linf) or grad / ||grad||_2 (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / lp_norm(grad, "l2").clamp_min(_TINY).view(_per_example(grad))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto {z : ||z - x|| <= eps} and then the box [0, 1]; eps a float or per-example tensor."""
    if not torch.is_tensor(eps):
        eps = torch.full((x.shape[0],), float(eps), device=x.device, dtype=x.dtype)
    e = eps.to(x.dtype).view(_per_example(x))
    delta = x_adv - x
    if norm == "linf":
        delta = torch.max(torch.min(delta, e), -e)
    else:
        scale = (e.flatten() / lp_norm(delta, "l2").clamp_min(_TINY)).clamp(max=1.0)
        delta = delta * scale.view(_per_example(x))
    return (x + delta).clamp(0, 1)


def random_in_ball(x: torch.Tensor, eps: float, norm: str, g: torch.Generator) -> torch.Tensor:
    """A perturbation drawn uniformly from the eps-ball of the norm (not yet clipped to the box)."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    d = x[0].numel()
    u = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    u = u / lp_norm(u, "l2").clamp_min(_TINY).view(_per_example(x))
    r = torch.rand(x.shape[0], generator=g, device=x.device, dtype=x.dtype).pow(1.0 / d) * eps
    return u * r.view(_per_example(x))
