"""Pre-processing defenses, model side (issue 14): the pre-processor networks, the defended model, the adversarial
transformation against a direct computation of Xiao & Zheng's Eq. 3, export and reload, and the config checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import attack_mode
from atscale.attacks.pgd import PGD
from atscale.config import ConfigError, load_config
from atscale.defenses import AdversarialTransform, DefendedModel, build_model
from atscale.defenses.export import load_defended, preprocessor_files
from atscale.errors import CheckpointError, ModelError
from atscale.models import NormalizedModel, create_model
from atscale.models.export import export_timm
from atscale.models.preprocessors import (APEDiscriminator, AttackDiscriminator, ImageDiscriminator, NRPNet,
                                          create_preprocessor)
from atscale.models.preprocessors.hgd import HGDUNet
from atscale.models.preprocessors.nrp import DenseBlock

SMALL = {"nrp": {"channels": 8, "growth": 4, "blocks": 2}, "hgd_unet": {"widths": [8, 16, 16]},
         "ape_g": {"widths": [8, 16]}, "arn": {"widths": [8, 16], "code": 8}}
TINY_NET = ["model.arch=resnet18", "model.kwargs={channels: [8, 16, 32, 64]}", "model.channels_last=false",
            "model.mean=[0.5, 0.5, 0.5]", "model.std=[0.5, 0.5, 0.5]"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_preprocessor_keeps_the_image_shape_and_trains(name: str) -> None:
    torch.manual_seed(0)
    net = create_preprocessor(name, SMALL[name])
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    out = net(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out - 0.5).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    if name in ("ape_g", "arn"):  # tanh / sigmoid outputs are images already
        assert out.min() >= 0 and out.max() <= 1
        with pytest.raises(ValueError, match="multiples of 4"):
            net(torch.rand(1, 3, 30, 30))


def test_nrp_blocks_are_dense_and_residual_and_hgd_subtracts_its_noise() -> None:
    block = DenseBlock(8, 4)
    assert [c.in_channels for c in block.convs] == [8, 12, 16, 20, 24]
    assert [c.out_channels for c in block.convs] == [4, 4, 4, 4, 8]
    nn.init.zeros_(block.convs[-1].weight), nn.init.zeros_(block.convs[-1].bias)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(x), x)
    assert len(NRPNet(channels=8, growth=4, blocks=3).trunk) == 3
    unet = HGDUNet(widths=[8, 16, 16]).eval()
    nn.init.zeros_(unet.noise.weight), nn.init.zeros_(unet.noise.bias)
    x = torch.rand(2, 3, 28, 28)  # not a power of two: the lateral maps fix the upsampled sizes
    assert torch.equal(unet(x), x)


def test_discriminators_give_one_logit_or_one_per_attack() -> None:
    assert APEDiscriminator((8, 16, 16))(torch.rand(4, 3, 32, 32)).shape == (4,)
    assert ImageDiscriminator((8, 16))(torch.rand(4, 3, 32, 32)).shape == (4,)
    assert AttackDiscriminator(code=8, attacks=3, width=8)(torch.rand(4, 8, 8, 8)).shape == (4, 3)


def test_unknown_preprocessor_or_sizes_are_clear_errors() -> None:
    with pytest.raises(ModelError, match="not a pre-processor.*nrp, hgd_unet"):
        create_preprocessor("unet", {})
    with pytest.raises(ModelError, match="not accepted by the 'nrp'"):
        create_preprocessor("nrp", {"width": 3})


def _defended(train: str = "both", name: str = "nrp") -> DefendedModel:
    cfg = load_config(None, [f"defense.preprocessor={name}", f"defense.kwargs={SMALL[name]}", f"defense.train={train}",
                             *TINY_NET, "model.init_from=x.pt" if train == "preprocessor" else "model.freeze=[]"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.defense, 10)


def test_attacks_and_gradients_see_the_whole_defended_model() -> None:
    model = _defended().eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model.net(model.normalize(model.preprocessor(xg))), y).backward()
    xm = x.clone().requires_grad_(True)
    F.cross_entropy(model(xm), y).backward()
    assert torch.equal(xg.grad, xm.grad)
    pgd = lambda: PGD(eps=16 / 255, step=4 / 255, iters=3, seed=1)  # noqa: E731
    full = pgd()(model, x, y)
    classifier_only = pgd()(NormalizedModel(model.net, [0.5] * 3, [0.5] * 3), x, y)
    assert not torch.equal(full, classifier_only)  # white-box = through P, not the classifier alone


def test_a_fixed_part_gets_no_updates_and_stays_in_eval_mode() -> None:
    model = _defended("preprocessor").train()
    assert not any(p.requires_grad for p in model.net.parameters())
    assert all(p.requires_grad for p in model.preprocessor.parameters())
    assert not model.net.training and model.preprocessor.training
    stats = {k: v.clone() for k, v in model.net.state_dict().items()}
    x = torch.rand(8, 3, 32, 32)
    with attack_mode(model):
        model(x)
    assert not model.net.training and model.preprocessor.training
    model(x).sum().backward()
    assert all(torch.equal(stats[k], v) for k, v in model.net.state_dict().items())  # BN statistics kept
    assert all(p.grad is None for p in model.net.parameters())


def _eq3_by_hand(fb: nn.Module, x: torch.Tensor, delta: float, iters: int, step: float, seed: int) -> torch.Tensor:
    """Xiao & Zheng Eq. 2-3 written out: least-likely target of f_b, uniform start in the delta-box, signed steps down
    f_b's cross-entropy towards the target, projected on the box and [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = fb(x).argmin(1)
    z = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * delta).clamp(0, 1)
    for _ in range(iters):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(fb(z), target, reduction="sum"), z)
        z = torch.min(torch.max(z.detach() - step * grad.sign(), (x - delta).clamp(min=0)), (x + delta).clamp(max=1))
    return z


def test_adversarial_transformation_is_eq3_seeded_per_call_with_an_identity_backward() -> None:
    torch.manual_seed(0)
    fb = create_model("vgg_small", 10, [0.5] * 3, [0.5] * 3, {"widths": [8, 16]}, channels_last=False).eval()
    g = AdversarialTransform(fb, delta=0.2, iters=13, step=0.2 / 6, seed=5)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = g(x)
    assert torch.equal(out.detach(), _eq3_by_hand(fb, x.detach(), 0.2, 13, 0.2 / 6, 5 * 1_000_003 + 0))
    assert (out - x).abs().max() <= 0.2 + 1e-6 and out.min() >= 0 and out.max() <= 1
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # BPDA-I: g's backward is the identity
    assert int(g.calls) == 1 and not torch.equal(g(x).detach(), out.detach())  # a new draw per call
    assert torch.equal(g.transform(x, call=0), out.detach())
    assert not any(p.requires_grad for p in g.parameters()) and "calls" in g.state_dict()
    g.train()
    assert not fb.training


@pytest.mark.parametrize("name", ["nrp", "arn"])
def test_export_writes_both_parts_and_one_call_loads_the_defended_model(name: str, tmp_path: Path) -> None:
    model = _defended(name=name).eval()
    out = export_timm(model, tmp_path / "export", mean=[0.5] * 3, std=[0.5] * 3, input_size=32,
                      files=preprocessor_files(model))
    assert {"model.safetensors", "config.json", "preprocessor.safetensors", "preprocessor.json"} <= \
        {p.name for p in out.iterdir()}
    back = load_defended(out)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert isinstance(back, DefendedModel) and torch.equal(back(x), model(x))
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # the classifier alone, plain timm
        assert torch.equal(plain((model.preprocessor(x) - 0.5) / 0.5), model(x))
    with pytest.raises(CheckpointError, match="not the export of a defended model"):
        load_defended(tmp_path / "nothing")


def test_adversarial_transformation_exports_with_its_f_b_and_call_count(tmp_path: Path) -> None:
    cfg = load_config(None, ["defense.preprocessor=adv_transform", "defense.base_kwargs={widths: [8, 16]}",
                             "defense.train=classifier", "defense.seed=3", *TINY_NET])
    model = build_model(cfg.model, cfg.defense, 10).eval()
    assert isinstance(model.preprocessor, AdversarialTransform)
    assert model.preprocessor.delta == pytest.approx(51 / 255) and model.preprocessor.step == pytest.approx(51 / 6 / 255)
    x = torch.rand(2, 3, 32, 32)
    model(x)
    out = export_timm(model, tmp_path / "e", mean=[0.5] * 3, std=[0.5] * 3, input_size=32,
                      files=preprocessor_files(model))
    back = load_defended(out)
    assert int(back.preprocessor.calls) == 1
    with torch.no_grad():
        assert torch.equal(back(x), model(x))  # the same f_b weights and the same next draw


@pytest.mark.parametrize("overrides, match", [
    (["defense.train=preprocessor"], "defense.preprocessor is empty"),
    (["defense.preprocessor=nrp", "defense.delta=20"], "belongs to the adversarial transformation"),
    (["defense.preprocessor=adv_transform", "defense.train=preprocessor"], "no weights to train"),
    (["defense.preprocessor=nrp", "defense.train=preprocessor"], "model.init_from is empty"),
    (["defense.preprocessor=adv_transform", "defense.delta=300"], "0 < delta <= 255"),
    (["defense.preprocessor=nrp", "model.bn_domains=[clean, adv]"], "Mixture BN"),
])
def test_bad_defense_configs_are_refused_when_loaded(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
