"""Smooth Adversarial Training activations (Xie thesis Chapter 5): closed forms, gradients, the Table 5.1 op, timm."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.pgd import PGD
from atscale.layers.activations import (ACTIVATIONS, ReLUSoftplusGrad, SmoothReLU, convert_activations,
                                        get_act_layer, relu_psoftplus_grad, smooth_relu)
from atscale.layers.context import attack_pass, evaluation, in_attack

D = torch.float64
GRID = torch.cat([torch.linspace(-6, 6, 241, dtype=D), torch.tensor([-1e-4, 0.0, 1e-4, 25.0, -25.0], dtype=D)])


def _sig(x: torch.Tensor, a: float = 1.0) -> torch.Tensor:
    return 1 / (1 + torch.exp(-a * x))


def _phi_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _smooth_relu_ref(x: torch.Tensor, a: float) -> torch.Tensor:
    xp = x.clamp_min(0)
    return torch.where(x >= 0, xp - torch.log(a * xp + 1) / a, torch.zeros_like(x))


# name, constructor kwargs, closed form f(x), analytic f'(x)  (Xie thesis Sec 5.3.2 Eqns 5.2-5.3, Sec 5.4 Eqns 5.4-5.6)
SMOOTH = [
    ("softplus", {}, lambda x: torch.log(1 + torch.exp(x)), lambda x: _sig(x)),
    ("psoftplus", {}, lambda x: torch.log(1 + torch.exp(10 * x)) / 10, lambda x: _sig(x, 10)),
    ("psoftplus", {"alpha": 3.0}, lambda x: torch.log(1 + torch.exp(3 * x)) / 3, lambda x: _sig(x, 3)),
    ("silu", {}, lambda x: x * _sig(x), lambda x: _sig(x) * (1 + x * (1 - _sig(x)))),
    ("gelu", {}, lambda x: x * _phi_cdf(x), lambda x: _phi_cdf(x) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
    ("elu", {}, lambda x: torch.where(x >= 0, x, torch.exp(x) - 1), lambda x: torch.where(x >= 0, 1.0, torch.exp(x))),
    ("celu", {"alpha": 2.0}, lambda x: torch.where(x >= 0, x, 2 * (torch.exp(x / 2) - 1)),
     lambda x: torch.where(x >= 0, 1.0, torch.exp(x / 2))),
    ("smoothrelu", {}, lambda x: _smooth_relu_ref(x, 400.0),
     lambda x: torch.where(x >= 0, 400 * x.clamp_min(0) / (1 + 400 * x.clamp_min(0)), 0.0)),
    ("smoothrelu", {"alpha": 2.5}, lambda x: _smooth_relu_ref(x, 2.5),
     lambda x: torch.where(x >= 0, 2.5 * x.clamp_min(0) / (1 + 2.5 * x.clamp_min(0)), 0.0)),
]
IDS = [f"{n}{kw or ''}" for n, kw, _, _ in SMOOTH]


def _make(name: str, kwargs: dict, **extra) -> nn.Module:
    return get_act_layer(name, **kwargs)(**extra).to(D)


@pytest.mark.parametrize("name,kwargs,f,df", SMOOTH, ids=IDS)
def test_values_and_analytic_gradient(name, kwargs, f, df):
    act = _make(name, kwargs, inplace=True)
    x = GRID.clone().requires_grad_(True)
    y = act(x)
    # rtol 1e-6: SmoothReLU's a is stored as a float32 parameter; F.softplus is linear above a x > 20 (error < 1e-9)
    torch.testing.assert_close(y, f(GRID), rtol=1e-6, atol=1e-10)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, df(GRID), rtol=1e-6, atol=1e-10)
    assert torch.equal(x.detach(), GRID), "inplace=True must be ignored"


@pytest.mark.parametrize("name,kwargs,f,df", SMOOTH, ids=IDS)
def test_gradcheck(name, kwargs, f, df):
    act = _make(name, kwargs)
    x = (torch.randn(3, 7, dtype=D, generator=torch.Generator().manual_seed(0)) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(act, (x,))


@pytest.mark.parametrize("alpha", [400.0, 2.5])
def test_smoothrelu_gradcheck_wrt_alpha(alpha):
    x = torch.randn(4, 5, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    a = torch.tensor(alpha, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(smooth_relu, (x, a))
    # through the module's positive parametrisation a = softplus(alpha_raw) + min_alpha
    m = SmoothReLU(alpha=alpha).to(D)
    assert torch.autograd.gradcheck(lambda t, raw: torch.func.functional_call(m, {"alpha_raw": raw}, (t,)),
                                    (x, m.alpha_raw.detach().clone().requires_grad_(True)))


def test_smoothrelu_alpha_init_and_stays_positive():
    m = SmoothReLU()
    assert m.alpha.item() == pytest.approx(400.0, rel=1e-6)
    assert [n for n, _ in m.named_parameters()] == ["alpha_raw"] and m.alpha_raw.ndim <= 1
    opt = torch.optim.SGD(m.parameters(), lr=1e6)
    for _ in range(3):
        opt.zero_grad()
        (m.alpha * 1e6).backward()  # a huge push of a towards -inf
        opt.step()
        assert m.alpha.item() > 0
    x = torch.randn(64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.alpha_raw.grad)
    assert (y >= 0).all() and (y <= x.detach().clamp_min(0)).all()
    assert SmoothReLU(alpha=400.0).alpha_raw.requires_grad


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_autocast_bf16_keeps_dtype(name):
    act = get_act_layer(name)()
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = nn.functional.conv2d(x, torch.randn(4, 4, 1, 1)).requires_grad_(True)
        assert xb.dtype == torch.bfloat16
        y = act(xb)
        assert act(x).dtype == torch.float32
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    ref = get_act_layer(name)().to(D)(xb.detach().to(D))
    torch.testing.assert_close(y.to(D), ref, rtol=2e-2, atol=2e-2)


# --- Table 5.1: ReLU forward, parametric-Softplus backward (Xie thesis Sec 5.3.2) ---

def _grads(mode: str, attack: bool, x: torch.Tensor, backward_outside: bool = False) -> tuple[torch.Tensor, ...]:
    act = ReLUSoftplusGrad(grad_mode=mode)
    x = x.clone().requires_grad_(True)
    g_out = torch.linspace(0.5, 2.0, x.numel(), dtype=x.dtype).view_as(x)
    if attack:
        with attack_pass():
            assert in_attack()
            y = act(x)
            if not backward_outside:
                (g,) = torch.autograd.grad(y, x, g_out)
        if backward_outside:
            (g,) = torch.autograd.grad(y, x, g_out)
    else:
        assert not in_attack()
        y = act(x)
        (g,) = torch.autograd.grad(y, x, g_out)
    return y, g, g_out


@pytest.mark.parametrize("mode,soft_in_attack,soft_in_train", [("attack", True, False), ("train", False, True),
                                                               ("both", True, True)])
def test_relu_forward_softplus_backward(mode, soft_in_attack, soft_in_train):
    x = torch.cat([GRID, -GRID[:10]]).view(2, -1)
    for attack, soft in ((True, soft_in_attack), (False, soft_in_train)):
        y, g, g_out = _grads(mode, attack, x)
        assert torch.equal(y, torch.relu(x))
        expect = g_out * _sig(x, 10) if soft else g_out * (x > 0).to(D)
        torch.testing.assert_close(g, expect, rtol=1e-12, atol=0)
    # the decision is taken in forward: a backward run after leaving attack_pass() still uses the attacker's gradient
    _, g_late, g_out = _grads(mode, True, x, backward_outside=True)
    torch.testing.assert_close(g_late, g_out * _sig(x, 10) if soft_in_attack else g_out * (x > 0).to(D))


def test_relu_psoftplus_grad_functional_and_validation():
    x = torch.randn(50, dtype=D).requires_grad_(True)
    relu_psoftplus_grad(x, 4.0).sum().backward()
    torch.testing.assert_close(x.grad, _sig(x.detach(), 4))
    with pytest.raises(ValueError, match="grad_mode"):
        ReLUSoftplusGrad(grad_mode="optimizer")


class _Probe(nn.Module):
    """x -> linear -> act -> linear, with pre-activations < 0 everywhere: ReLU's input gradient is exactly 0."""

    def __init__(self, act: nn.Module):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(12, 6), act, nn.Linear(6, 3)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(6, 12, generator=g) * 0.1)
            self.fc1.bias.fill_(-3.0)
            self.fc2.weight.copy_(torch.randn(3, 6, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("mode", ["attack", "train", "both"])
def test_pgd_uses_softplus_gradient_only_when_selected(mode):
    model = _Probe(ReLUSoftplusGrad(grad_mode=mode))
    x = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    pgd = PGD(eps=8 / 255, step=8 / 255, iters=1, clean_start_prob=1.0)
    with attack_pass():  # attack_mode enters attack_pass() itself; nesting keeps the test independent of that
        x_adv = pgd(model, x, y)
    # expected attacker step: ReLU forward, the loss gradient at the activation's output times sigmoid(10 h)
    xr = x.clone().requires_grad_(True)
    h = model.fc1(xr.flatten(1))
    a = torch.relu(h).detach().requires_grad_(True)
    (g_a,) = torch.autograd.grad(F.cross_entropy(model.fc2(a), y, reduction="sum"), a)
    (g_x,) = torch.autograd.grad(h, xr, g_a * torch.sigmoid(10.0 * h.detach()))
    assert (h < 0).all() and (g_x != 0).all()
    if mode == "train":
        assert torch.equal(x_adv, x)  # ReLU gradient is 0: PGD cannot move
    else:
        torch.testing.assert_close(x_adv, (x + 8 / 255 * g_x.sign()).clamp(0, 1))
        assert (x_adv != x).any()
    # the optimizer's pass after the attack: Softplus gradient in "train"/"both", none in "attack"
    model.zero_grad()
    F.cross_entropy(model(x_adv), y).backward()
    assert (model.fc1.weight.grad.abs().sum() > 0) == (mode != "attack")


@pytest.mark.parametrize("eval_soft", [False, True])
def test_evaluation_attacks_use_relu_gradient_unless_asked(eval_soft):
    """Table 5.1 is evaluated on the ReLU network: inside evaluation() every mode attacks with ReLU's gradient (here 0,
    so PGD cannot move), or with the Softplus gradient when eval_soft (the stronger evaluator of Sec 5.3.2)."""
    x = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    for mode in ("attack", "both"):
        model = _Probe(ReLUSoftplusGrad(grad_mode=mode, eval_soft=eval_soft))
        pgd = PGD(eps=8 / 255, step=8 / 255, iters=1, clean_start_prob=1.0)
        with evaluation():
            x_adv = pgd(model, x, y)
        assert torch.equal(x_adv, x) != eval_soft
        assert not torch.equal(pgd(model, x, y), x)  # the same attack in training moves


# --- timm models ---

def _no_relu(model: nn.Module) -> bool:
    return not any(type(m) is nn.ReLU for m in model.modules())


def _fwd_bwd(model: nn.Module) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    return out


def test_timm_resnet18_act_layer():
    model = timm.create_model("resnet18", num_classes=10, act_layer=get_act_layer("silu"))
    assert _no_relu(model) and isinstance(model.act1, nn.SiLU)
    _fwd_bwd(model)
    model = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64],
                              act_layer=get_act_layer("smoothrelu", alpha=100.0))
    acts = [m for m in model.modules() if isinstance(m, SmoothReLU)]
    assert len(acts) == 17 and _no_relu(model)
    assert all(m.alpha.item() == pytest.approx(100.0, rel=1e-6) for m in acts)
    _fwd_bwd(model)
    assert all(m.alpha_raw.grad is not None for m in acts)


@pytest.mark.parametrize("name,kwargs", [("softplus", {}), ("psoftplus", {}), ("silu", {}), ("gelu", {}), ("elu", {}),
                                         ("celu", {}), ("smoothrelu", {}),
                                         ("relu_psoftplus_grad", {"grad_mode": "train"})])
def test_convert_activations_timm_resnet18(name, kwargs):
    model = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64])
    n_relu = sum(type(m) is nn.ReLU for m in model.modules())
    assert n_relu == 17
    assert convert_activations(model, name, **kwargs) is model
    cls = ACTIVATIONS[name]
    assert _no_relu(model) and sum(type(m) is cls for m in model.modules()) == n_relu
    if name == "relu_psoftplus_grad":
        assert model.act1.grad_mode == "train"
    _fwd_bwd(model)
    back = convert_activations(model, "relu")
    assert sum(type(m) is nn.ReLU for m in back.modules()) == n_relu


def test_convert_keeps_inplace_of_replaced_relu():
    model = convert_activations(timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]), "relu")
    assert model.act1.inplace and model.layer1[0].act2.inplace


def test_relu_psoftplus_grad_model_forward_is_relu_model():
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).eval()
    abl = convert_activations(timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).eval(),
                              "relu_psoftplus_grad", grad_mode="both")
    abl.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ref(x), abl(x))


def test_unknown_names_and_kwargs():
    with pytest.raises(ValueError) as e:
        get_act_layer("swishy")
    for n in ("relu", "softplus", "psoftplus", "silu", "gelu", "elu", "celu", "smoothrelu", "relu_psoftplus_grad"):
        assert n in str(e.value)
    with pytest.raises(ValueError, match="swishy"):
        convert_activations(nn.Sequential(nn.ReLU()), "swishy")
    with pytest.raises(ValueError, match="beta"):
        get_act_layer("psoftplus", beta=3)
    assert get_act_layer("RELU") is nn.ReLU
    assert isinstance(convert_activations(nn.ReLU(), "gelu"), nn.GELU)
