"""Mixture BN training on digits (Xie thesis Sec 6.4.2): separate clean / adv BNs, evaluation per domain, export of
one domain to plain timm, and the configuration errors of the BN-splitting objectives."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from atscale.config import ConfigError, load_config
from atscale.checkpoint import model_from_checkpoint
from atscale.evaluate import evaluate_checkpoint, export_checkpoint
from atscale.train import main
from conftest import tiny_overrides


def test_mbn_domains_show_the_papers_pattern_and_export(digits_root: Path, tmp_path: Path) -> None:
    """MBN_clean is the better clean classifier, MBN_adv the more robust one (Sec 6.4.2, Table 6.2's pattern)."""
    over = tiny_overrides(digits_root, tmp_path, "mbn", **{
        "objective.name": "mbn", "model.bn_domains": ["clean", "adv"], "model.eval_domain": "adv",
        "schedule.epochs": 3, "eval.steps": [5], "eval.max_images": 359})
    main(load_config(None, over))
    ckpt = tmp_path / "mbn" / "checkpoints" / "last.pt"
    res = {d: evaluate_checkpoint(ckpt, [f"eval.bn_domain={d}", "log.progress=false", f"eval.out={tmp_path / d}"])[
        "results"] for d in ("clean", "adv")}
    assert res["clean"]["clean"]["acc"] > res["adv"]["clean"]["acc"]
    assert res["adv"]["pgd5"]["acc"] > res["clean"]["pgd5"]["acc"]

    model, _, _ = model_from_checkpoint(ckpt, torch.device("cpu"), bn_domain="clean")
    folder = export_checkpoint(ckpt, tmp_path / "export_clean", bn_domain="clean")
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert not any("bns." in k for k in plain.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - 0.5) / 0.5), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["mbn", "advprop"])
def test_split_bn_objectives_need_a_bn_model_with_both_domains(objective: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.bn_domains"):
        load_config(None, [f"objective.name={objective}"])
    with pytest.raises(ConfigError, match="model.bn_domains"):
        load_config(None, [f"objective.name={objective}", "model.bn_domains=[clean, aug]"])
    with pytest.raises(ConfigError, match="eval_domain"):
        load_config(None, ["model.bn_domains=[clean, adv]", "model.eval_domain=aux"])
    cfg = load_config(None, [f"objective.name={objective}", "model.bn_domains=[clean, adv]"])
    assert cfg.model.bn_domains == ["clean", "adv"]


def test_bn_domains_on_a_groupnorm_model_is_an_error(digits_root: Path, tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "gn", **{
        "model.kwargs": {"channels": [32, 64, 128, 256], "norm_layer": "groupnorm"},
        "model.bn_domains": ["clean", "adv"], "objective.name": "mbn", "run.max_steps": 1})
    with pytest.raises(Exception, match="needs BatchNorm layers.*GroupNorm"):
        main(load_config(None, over))


def test_fine_grained_advprop_routes_clean_autoaugment_and_adversarial_to_their_bns() -> None:
    """Sec 7.5.4: main BNs see only clean images without AutoAugment, one auxiliary BN set only the AutoAugment images,
    the other only the adversarial examples crafted from them (through the adversarial BNs)."""
    from atscale.attacks import PGD
    from atscale.data.augment import AutoAugmentBatch
    from atscale.layers.context import bn_domain
    from atscale.layers.mixture_bn import MixtureBatchNorm2d
    from atscale.models import create_model
    from atscale.training.objectives import FineGrainedAdvProp

    torch.manual_seed(0)
    model = create_model("resnet18", 10, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]},
                         bn_domains=("clean", "aug", "adv"), eval_domain="clean")
    ref = {d: create_model("resnet18", 10, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]}) for d in
           ("clean", "aug", "adv")}
    for r in ref.values():
        r.load_state_dict({k.replace("bns.clean.", ""): v for k, v in model.state_dict().items()
                           if "bns." not in k or "bns.clean." in k})
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    obj = FineGrainedAdvProp(AutoAugmentBatch("imagenet", seed=1))
    pgd = PGD(8 / 255, 2 / 255, 2, seed=0)
    calls = []
    hook = model.net.bn1.register_forward_pre_hook(lambda m, a: calls.append(bn_domain()))
    model.train()
    x_aug, x_adv = obj.make_adv(model, pgd, x, y)
    hook.remove()
    assert calls and set(calls) == {"adv"}  # the attack runs through the adversarial BNs
    assert not torch.equal(x_aug, x) and (x_adv - x_aug).abs().max() <= 8 / 255 + 1e-6
    out = obj(model, x, (x_aug, x_adv), y)
    expect = sum(torch.nn.functional.cross_entropy(ref[d](b), y) for d, b in
                 (("clean", x), ("aug", x_aug), ("adv", x_adv)))
    torch.testing.assert_close(out.loss, expect, rtol=1e-4, atol=1e-5)
    for name, m in model.named_modules():
        if isinstance(m, MixtureBatchNorm2d):
            for d in ("clean", "aug", "adv"):
                torch.testing.assert_close(m.bns[d].running_mean, dict(ref[d].named_modules())[name].running_mean)
            assert not torch.allclose(m.bns["aug"].running_mean, m.bns["adv"].running_mean)
