"""Activations of Smooth Adversarial Training (Xie thesis Chapter 5) and the Table 5.1 backward-pass ablation.

Every activation here can be a timm ``act_layer``: ``get_act_layer(name, **kwargs)`` returns a class or a
``functools.partial`` that timm instantiates as ``act_layer(inplace=True)`` or ``act_layer()``; all except torch's
ReLU accept and ignore ``inplace``. Models that take no ``act_layer`` are converted with ``convert_activations``.

- Xie thesis Sec 5.3.2: parametric Softplus ``(1/a) log(1 + exp(a x))``, a = 10 (Eqn 5.2), and the Table 5.1 ablation
  ``ReLUSoftplusGrad``: ReLU forward, parametric-Softplus derivative ``sigmoid(a x)`` (Eqn 5.3) in the backward pass
  of the attacker's passes, the optimizer's passes, or both.
- Xie thesis Sec 5.4.1: Softplus, SiLU, GELU, ELU (alpha 1); Sec 5.4.3: CELU.
- Xie thesis Sec 5.4.2: SmoothReLU ``x - log(a x + 1)/a`` for x >= 0, else 0 (Eqn 5.4), learnable a > 0, init 400.

Under autocast the output keeps the input's dtype: element-wise activations run with autocast disabled (CUDA autocast
would otherwise promote softplus to float32 and save a float32 copy for backward); the custom autograd functions save
only their input, like ReLU, and compute in at least float32 internally.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from atscale.layers.context import in_attack, in_evaluation

GRAD_MODES = ("attack", "train", "both")


def _native(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run the element-wise ``fn`` in ``x``'s own dtype even under autocast."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return fn(x)
    return fn(x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class ParametricSoftplus(nn.Module):
    """Parametric Softplus ``(1/a) log(1 + exp(a x))`` (Xie thesis Sec 5.3.2, Eqn 5.2); a = 10 approximates ReLU.

    Computed as ``F.softplus(x, beta=a)``, which is linear above ``a x > 20`` and so never overflows.
    """

    def __init__(self, alpha: float = 10.0, inplace: bool = False):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"parametric Softplus needs alpha > 0, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native(lambda t: F.softplus(t, beta=self.alpha), x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Softplus(ParametricSoftplus):
    """Softplus ``log(1 + exp(x))`` (Xie thesis Sec 5.4.1): parametric Softplus with a = 1."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(alpha)


class SiLU(nn.SiLU):
    """SiLU ``x * sigmoid(x)`` (Xie thesis Sec 5.4.1); ``inplace`` is accepted and ignored."""

    def __init__(self, inplace: bool = False):
        super().__init__(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native(F.silu, x)


class GELU(nn.GELU):
    """GELU ``x * Phi(x)`` (Xie thesis Sec 5.4.1), exact erf form by default; ``inplace`` is accepted and ignored."""

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__(approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native(lambda t: F.gelu(t, approximate=self.approximate), x)


class ELU(nn.ELU):
    """ELU: x for x >= 0, else ``alpha (exp(x) - 1)`` (Xie thesis Sec 5.4.1); C1 only for alpha = 1 (Sec 5.4.3)."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(alpha=alpha, inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native(lambda t: F.elu(t, alpha=self.alpha), x)


class CELU(nn.CELU):
    """CELU ``max(0, x) + min(0, alpha (exp(x / alpha) - 1))`` (Xie thesis Sec 5.4.3): C1-smooth for every alpha."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(alpha=alpha, inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native(lambda t: F.celu(t, alpha=self.alpha), x)


class _SmoothReLUFn(torch.autograd.Function):
    """SmoothReLU with analytic gradients (Xie thesis Sec 5.4.2, Eqns 5.4-5.5); saves only ``x`` and ``alpha``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        dt = _compute_dtype(x)
        a, r = alpha.to(dt), x.to(dt).clamp_min(0)
        return (r - torch.log1p(a * r) / a).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, alpha = ctx.saved_tensors
        dt = _compute_dtype(x)
        a, r, g = alpha.to(dt), x.to(dt).clamp_min(0), grad.to(dt)
        ar = a * r
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = (g * ar / (1 + ar)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            da = torch.log1p(ar) / (a * a) - r / (a * (1 + ar))
            ga = (g * da).sum().reshape(alpha.shape).to(alpha.dtype)
        return gx, ga


def smooth_relu(x: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """SmoothReLU(x, a) = x - log(a x + 1)/a for x >= 0, else 0 (Xie thesis Sec 5.4.2, Eqn 5.4); differentiable in a."""
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(float(alpha), dtype=_compute_dtype(x), device=x.device)
    return _SmoothReLUFn.apply(x, alpha)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class SmoothReLU(nn.Module):
    """SmoothReLU (Xie thesis Sec 5.4.2) with one learnable a > 0 per layer, shared by all channels, initialised at 400.

    Positivity: the stored parameter is ``alpha_raw`` and ``a = softplus(alpha_raw) + min_alpha``. For a >> 1 (the
    working range, a = 400 at init) ``d a / d alpha_raw = sigmoid(alpha_raw) ~ 1``, so the optimizer sees the same
    gradient as for a directly stored a; no step can make a <= 0 and the gradient never dies as a clamp's would.
    ``alpha_raw`` is 0-d, so optimizers that exempt ndim <= 1 parameters from weight decay exempt it.
    """

    def __init__(self, alpha: float = 400.0, min_alpha: float = 1e-3, inplace: bool = False):
        super().__init__()
        if not alpha > min_alpha > 0:
            raise ValueError(f"SmoothReLU needs alpha > min_alpha > 0, got alpha={alpha}, min_alpha={min_alpha}")
        self.min_alpha = float(min_alpha)
        self.alpha_raw = nn.Parameter(torch.tensor(_inverse_softplus(alpha - min_alpha)))

    @property
    def alpha(self) -> torch.Tensor:
        return F.softplus(self.alpha_raw) + self.min_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smooth_relu(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.4g}, min_alpha={self.min_alpha}"


class _ReLUSoftplusGradFn(torch.autograd.Function):
    """ReLU forward; backward ``grad * sigmoid(alpha x)`` (Xie thesis Sec 5.3.2, Eqn 5.3) when ``soft``, else ReLU's."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, alpha: float, soft: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.soft = alpha, soft
        return torch.relu(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        if ctx.soft:
            dt = _compute_dtype(x)
            return (grad.to(dt) * torch.sigmoid(ctx.alpha * x.to(dt))).to(grad.dtype), None, None
        return grad * (x > 0).to(grad.dtype), None, None


def relu_psoftplus_grad(x: torch.Tensor, alpha: float = 10.0, soft: bool = True) -> torch.Tensor:
    """``relu(x)`` with parametric Softplus's derivative in backward when ``soft`` (Xie thesis Sec 5.3.2, Table 5.1)."""
    return _ReLUSoftplusGradFn.apply(x, float(alpha), bool(soft))


class ReLUSoftplusGrad(nn.Module):
    """The Table 5.1 ablation (Xie thesis Sec 5.3.2): exactly ReLU forward, parametric Softplus (a = 10) gradient.

    ``grad_mode`` picks the passes whose backward uses ``sigmoid(a x)``: "attack" (the attacker's passes only, inner
    maximization), "train" (the optimizer's passes only, outer minimization) or "both"; all other passes get ReLU's
    gradient. Evaluation attacks (``atscale.layers.context.in_evaluation()``) get ReLU's gradient, as the model's
    inference is exactly ReLU (the thesis evaluates Table 5.1 with PGD-200 on the ReLU network and reports the stronger
    Softplus-gradient evaluation attacker separately); ``eval_soft=True`` gives them the Softplus gradient instead.
    The pass is read from ``atscale.layers.context`` here, in forward, and stored in the autograd context: backward
    may run on another thread (GPU autograd), where context variables are not propagated.
    Activation checkpointing would recompute forward outside the pass's context; do not combine the two.
    """

    def __init__(self, alpha: float = 10.0, grad_mode: str = "both", eval_soft: bool = False, inplace: bool = False):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {list(GRAD_MODES)}, got '{grad_mode}'")
        if alpha <= 0:
            raise ValueError(f"parametric Softplus needs alpha > 0, got {alpha}")
        self.alpha = float(alpha)
        self.grad_mode = grad_mode
        self.eval_soft = bool(eval_soft)

    def soft_now(self) -> bool:
        """Whether a backward through a forward run now would use the Softplus gradient."""
        if in_evaluation():
            return self.eval_soft
        if self.grad_mode == "both":
            return True
        return in_attack() == (self.grad_mode == "attack")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_psoftplus_grad(x, self.alpha, self.soft_now())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, grad_mode={self.grad_mode}, eval_soft={self.eval_soft}"


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": Softplus,
    "psoftplus": ParametricSoftplus,
    "silu": SiLU,
    "gelu": GELU,
    "elu": ELU,
    "celu": CELU,
    "smoothrelu": SmoothReLU,
    "relu_psoftplus_grad": ReLUSoftplusGrad,
}


def get_act_layer(name: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """The class (or a ``functools.partial`` binding ``kwargs``) for activation ``name`` (Xie thesis Sec 5.3-5.4).

    Usable as timm's ``act_layer``: ``timm.create_model('resnet50', act_layer=get_act_layer('silu'))``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; allowed: {sorted(ACTIVATIONS)}")
    cls = ACTIVATIONS[key]
    if not kwargs:
        return cls
    params = inspect.signature(cls.__init__).parameters
    bad = sorted(k for k in kwargs if k not in params or k in ("self", "inplace"))
    if bad:
        allowed = [p for p in params if p not in ("self", "inplace")]
        raise ValueError(f"activation '{key}' takes no argument(s) {bad}; it takes {allowed}")
    return functools.partial(cls, **kwargs)


def _convertible_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.ReLU, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.Softplus, nn.Mish,
                                    ParametricSoftplus, SmoothReLU, ReLUSoftplusGrad]
    try:
        from timm.layers import activations as ta, activations_me as tme
    except ImportError:
        return tuple(types)
    for mod, names in ((ta, ("Swish", "GELU", "GELUTanh", "QuickGELU", "Mish")), (tme, ("SwishMe", "MishMe"))):
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(types)


def convert_activations(model: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """Replace every ReLU-like activation module of ``model`` by a fresh ``name`` activation (Xie thesis Sec 5.4).

    Replaced: torch's ReLU, SiLU, GELU, ELU, CELU, Softplus, Mish, timm's Swish/GELU/Mish variants and this module's
    activations (gates such as Sigmoid, and ReLU6 / hard-swish, are left alone). ``kwargs`` go to the new activation; a
    replaced module's ``inplace`` flag is passed on (only torch's ReLU uses it). Works in place and returns ``model``,
    or the new activation when ``model`` itself is one.
    """
    make = get_act_layer(name, **kwargs)
    types = _convertible_types()

    def fresh(old: nn.Module) -> nn.Module:
        return make(inplace=bool(getattr(old, "inplace", False)))

    if isinstance(model, types):
        return fresh(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, types):
                setattr(parent, child_name, fresh(child))
    return model
