"""JATP (Zhou et al., Eq. 5-10), its static-example twin (nrp_static) and HGD (Liao et al. 2018, Eq. 2), each checked
against a direct computation on a fixed batch, and in real runs against a fixed target."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atscale.attacks.pgd import PGD
from atscale.checkpoint import load_checkpoint
from atscale.config import ConfigError, load_config
from atscale.defenses import build_model
from atscale.train import main
from atscale.training.preprocessor_objectives import JATP, HGDLoss

from conftest import tiny_overrides

LAYER = "layer3.1.conv2"
NRP = {"defense.preprocessor": "nrp", "defense.kwargs": {"channels": 8, "growth": 4, "blocks": 1}}


def _model(train: str = "preprocessor"):
    cfg = load_config(None, ["defense.preprocessor=nrp", "defense.kwargs={channels: 8, growth: 4, blocks: 1}",
                             f"defense.train={train}", "model.init_from=t.pt", "model.arch=resnet18",
                             "model.kwargs={channels: [8, 16, 32, 64]}", "model.channels_last=false"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.defense, 10).eval()


def _features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P(images), logits, T's feature map at LAYER), with a hook of the test's own."""
    seen = {}
    layer = dict(model.net.named_modules())[LAYER]
    h = layer.register_forward_hook(lambda _m, _i, o: seen.setdefault("f", o))
    try:
        purified = model.preprocessor(images)
        logits = model.net(model.normalize(purified))
    finally:
        h.remove()
    return purified, logits, seen["f"]


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1)
    return x, x_adv, torch.tensor([0, 1, 2, 3, 4, 5])


def test_jatp_loss_is_eq_6_to_10() -> None:
    model = _model()
    x, x_adv, y = _batch()
    out = JATP(LAYER, alpha=5.0, beta=3.0)(model, x, x_adv, y)
    _, clean, f_clean = _features(model, x)
    purified_adv, adv, f_adv = _features(model, x_adv)
    p_adv, p_clean = adv.softmax(1), clean.softmax(1)
    terms = []
    for i in range(len(y)):
        wrong = max(p_adv[i, k] for k in range(10) if k != y[i])
        bce = -torch.log(p_adv[i, y[i]]) - torch.log(1 - wrong)  # Eq. 7
        fsm = ((f_adv[i] - f_clean[i]) ** 2).mean()  # Eq. 8, MSE
        pix = ((purified_adv[i] - x[i]) ** 2).mean()  # Eq. 6, per pixel (see the module docstring)
        terms.append(bce + 5.0 * fsm * (1 - p_clean[i, y[i]]) + 3.0 * pix)  # Eq. 9-10
    assert torch.allclose(out.loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.logits, adv) and torch.equal(out.clean_logits, clean)


def test_jatp_full_examples_ascend_the_feature_distance_through_the_whole_model() -> None:
    """Eq. 5 by hand: uniform start in the eps-box, signed steps up the feature MSE of T(P(.)), projected."""
    model = _model()
    x, _, y = _batch()
    eps, step, iters = 8 / 255, 0.01, 4
    attack = PGD(eps=eps, step=step, iters=iters, seed=3)
    got = JATP(LAYER).make_adv(model, attack, x, y)

    g = torch.Generator().manual_seed(3)
    ref = _features(model, x)[2].detach()
    z = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    start = z.clone()
    for _ in range(iters):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad((_features(model, z)[2] - ref).square().flatten(1).mean(1).sum(), z)
        z = (x + (z.detach() + step * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    assert torch.equal(got, z)
    dist = lambda a: (_features(model, a)[2] - ref).square().mean().item()  # noqa: E731
    assert dist(got) > dist(start)
    assert not any(p.grad is not None for p in model.parameters())


def test_static_examples_attack_the_target_alone_and_hgd_is_its_l1_guided_loss() -> None:
    model = _model()
    x, x_adv, y = _batch()
    static = JATP(LAYER, full=False).make_adv(model, PGD(eps=8 / 255, step=2 / 255, iters=3, seed=4), x, y)
    view = model.classifier_view()
    assert torch.equal(static, PGD(eps=8 / 255, step=2 / 255, iters=3, seed=4)(view, x, y))
    assert torch.equal(HGDLoss().make_adv(model, PGD(eps=8 / 255, step=2 / 255, iters=3, seed=4), x, y), static)

    out = HGDLoss()(model, x, x_adv, y)  # LGD: the logits guide
    _, adv, _ = _features(model, x_adv)
    target = model.net(model.normalize(x))  # the target on the clean image, without P
    assert torch.allclose(out.loss, (adv - target).abs().mean(), rtol=1e-6)
    out = HGDLoss(LAYER)(model, x, x_adv, y)  # FGD: a feature map guides
    seen = {}
    h = dict(model.net.named_modules())[LAYER].register_forward_hook(lambda _m, _i, o: seen.setdefault("f", o))
    model.net(model.normalize(x))
    h.remove()
    assert torch.allclose(out.loss, (_features(model, x_adv)[2] - seen["f"]).abs().mean(), rtol=1e-6)


def _target(trained_digits_model) -> Path:
    return trained_digits_model[1].run_dir / "checkpoints" / "last.pt"


@pytest.mark.parametrize("objective, train", [("jatp", "preprocessor"), ("jatp", "both"), ("hgd", "preprocessor")])
def test_jatp_and_hgd_runs_train_the_preprocessor_against_the_target(
        objective: str, train: str, digits_root: Path, tmp_path: Path, trained_digits_model) -> None:
    target = _target(trained_digits_model)
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, objective, **NRP, **{
        "objective.name": objective, "defense.train": train, "defense.feature_layer": LAYER if objective == "jatp"
        else "", "model.init_from": str(target), "attack.eps": 8, "attack.step": 2.55, "attack.iters": 2,
        "run.max_steps": 3}))
    assert main(cfg)["step"] == 3
    before, after = load_checkpoint(target)["model"], load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["model"]
    fixed = all(torch.equal(after[k], v) for k, v in before.items())
    assert fixed == (train == "preprocessor")  # JATP' (both) updates the target too


def test_a_feature_layer_the_target_lacks_is_refused_before_any_step(digits_root: Path, tmp_path: Path,
                                                                    trained_digits_model) -> None:
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "bad_layer", **NRP, **{
        "objective.name": "jatp", "defense.train": "preprocessor", "defense.feature_layer": "layer3.9.conv2",
        "model.init_from": str(_target(trained_digits_model))}))
    with pytest.raises(ConfigError, match=r"defense.feature_layer = 'layer3.9.conv2' is not a module.*layer3.1"):
        main(cfg)
    assert not (cfg.run_dir / "checkpoints").exists() or not any((cfg.run_dir / "checkpoints").iterdir())
