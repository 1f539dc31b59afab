"""Modern robust-ImageNet architectures through timm (issue 16; Singh et al. 2023, "Revisiting Adversarial Training for
ImageNet"): ConvNeXt (+ ConvStem), Swin, ViT / DeiT, XCiT and WideResNet-50-2 digits twins train with PGD-3 in the
loop; the attack passes leave parameters, norm statistics and the stochastic layers as ``attack_mode`` documents;
timm's activation checkpointing is exact for LayerNorm models; BatchNorm-only features refuse LayerNorm models; the
ConvStem ConvNeXt exports and reloads with plain timm. Real timm models and real FFCV digits data throughout."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterator

import pytest
import timm
import torch
import yaml
from torch import nn

from atscale.attacks.base import attack_mode
from atscale.attacks.pgd import PGD
from atscale.config import load_config
from atscale.errors import ConfigError, ModelError
from atscale.layers.checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from atscale.layers.context import evaluation, set_stochastic_attack, stochastic_attack
from atscale.models import create_model
from atscale.models.convstem import CONVSTEM_MODELS, ConvStem
from atscale.models.export import export_timm
from atscale.models.factory import require_batchnorm
from atscale.train import main

MEAN = STD = [0.5, 0.5, 0.5]


@pytest.fixture(autouse=True)
def one_thread_and_switch_off() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    set_stochastic_attack(False)


def tiny_vit(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.3, drop_rate=0.2,
                proj_drop_rate=0.1, attn_drop_rate=0.1, patch_drop_rate=0.25, dynamic_img_size=True)
    return create_model("vit_small_patch16_224", 10, MEAN, STD, {**args, **kwargs}, channels_last=False)


def tiny_convnext(arch: str = "convnext_tiny", **kwargs) -> nn.Module:
    args = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), ls_init_value=0.5, drop_path_rate=0.3)
    return create_model(arch, 10, MEAN, STD, {**args, **kwargs}, channels_last=False)


def tiny_bn_net() -> nn.Module:
    return create_model("resnet18", 10, MEAN, STD, {"channels": [8, 16, 32, 64], "drop_rate": 0.3},
                        channels_last=False)


def images(n: int = 8, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pgd(seed: int = 3) -> PGD:
    return PGD(eps=8 / 255, step=2 / 255, iters=3, targeted=False, seed=seed)


# ---- ConvStem (Singh et al. 2023, Sec 3.1) ----

def test_convstem_variants_are_registered_with_the_papers_stems() -> None:
    assert set(CONVSTEM_MODELS) == {f"convnext_{s}_convstem" for s in ("tiny", "small", "base", "large")}
    expect = {"tiny": ([48, 96], [2, 2]), "small": ([48, 96], [2, 2]), "base": ([64, 96, 128], [2, 2, 1]),
              "large": ([96, 144, 192], [2, 2, 1])}
    for size, (widths, strides) in expect.items():
        with torch.device("meta"):
            net = timm.create_model(f"convnext_{size}_convstem", num_classes=10)
        assert isinstance(net.stem, ConvStem)
        convs = [m for m in net.stem if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == widths and [c.stride[0] for c in convs] == strides
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert [type(m).__name__ for m in net.stem][:3] == ["Conv2d", "LayerNorm2d", "GELU"]
        assert net.stages[0].downsample.__class__.__name__ == "Identity"  # stage 0 unchanged: stride 4, dims[0]
    net = timm.create_model("convnext_tiny_convstem", num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    assert net.forward_features(torch.rand(2, 3, 64, 64)).shape == (2, 128, 2, 2)  # overall stride 32 as ConvNeXt
    with pytest.raises(ModelError, match="overall stride 4"):
        tiny_convnext("convnext_tiny_convstem", stem_strides=(2, 1))


def test_convstem_export_reloads_with_plain_timm(tmp_path: Path) -> None:
    model = tiny_convnext("convnext_base_convstem", stem_ratios=(0.5, 1.0), stem_strides=(4, 1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_timm(model, tmp_path / "e", mean=MEAN, std=STD, input_size=32, crop_pct=1.0)
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == "convnext_base_convstem"
    assert conf["model_args"]["stem_strides"] == [4, 1] and conf["model_args"]["dims"] == [16, 32, 64, 128]
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert [c.stride[0] for c in plain.stem if isinstance(c, nn.Conv2d)] == [4, 1]
    x, _ = images(4)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - 0.5) / 0.5), model(x))


# ---- attack passes ----

@pytest.mark.parametrize("make", [tiny_vit, tiny_convnext, tiny_bn_net], ids=["vit", "convnext_ls", "resnet_bn"])
def test_training_attack_leaves_parameters_statistics_and_flags(make) -> None:
    torch.manual_seed(0)
    model = make().train()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)  # model.freeze: restored as it was, not turned on
    before, flags = state(model), {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = images()
    for on in (False, True):
        set_stochastic_attack(on)
        x_adv = pgd()(model, x, y)
        assert (x_adv - x).abs().max() > 0
        after = state(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert all(p.grad is None for p in model.parameters())
        assert {n: m.training for n, m in model.named_modules()} == flags
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    if make is tiny_bn_net:
        assert any(k.endswith("running_mean") for k in before)  # the BN statistics are among the compared buffers
    if make is tiny_convnext:
        assert any(k.endswith(".gamma") for k in before)  # LayerScale: a frozen parameter, compared too


def _forward_twice(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with attack_mode(model), torch.no_grad():
        return model(x), model(x)


@pytest.mark.parametrize("make", [tiny_vit, tiny_convnext], ids=["vit", "convnext_ls"])
def test_stochastic_layers_are_off_by_default_and_on_with_the_switch(make) -> None:
    torch.manual_seed(0)
    model = make().train()
    x, y = images()
    assert not stochastic_attack()
    a, b = _forward_twice(model, x)
    assert torch.equal(a, b)  # deterministic network inside the attack
    x1, x2 = pgd(seed=5)(model, x, y), pgd(seed=5)(model, x, y)
    assert torch.equal(x1, x2)

    set_stochastic_attack(True)
    assert stochastic_attack()
    a, b = _forward_twice(model, x)
    assert not torch.allclose(a, b)  # drop path / dropout draw inside the training attack's passes
    with attack_mode(model):
        assert all(m.training for m in model.modules() if type(m).__name__ in ("DropPath", "Dropout", "PatchDropout"))
        assert not any(m.training for m in model.modules() if "Norm" in type(m).__name__)
    with evaluation():
        assert not stochastic_attack()
        a, b = _forward_twice(model, x)
        assert torch.equal(a, b)  # evaluation attacks never see them
    model.eval()
    a, b = _forward_twice(model, x)
    assert torch.equal(a, b)  # nor a model entered in eval mode


def test_stochastic_switch_keeps_bn_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = tiny_bn_net().train()
    set_stochastic_attack(True)
    before = state(model)
    with attack_mode(model), torch.no_grad():
        assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert model.net.training  # timm ResNet: its own flag switches only the head's F.dropout
        a, b = model(images()[0]), model(images()[0])
    assert not torch.allclose(a, b)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


# ---- activation checkpointing through timm ----

def _param_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same drop path / dropout draws in both runs (checkpoint replays them)
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_timm_checkpointing_gives_the_same_gradients_for_a_vit() -> None:
    torch.manual_seed(0)
    model = tiny_vit().train()
    x, y = images()
    plain = _param_grads(model, x, y)
    assert enable_activation_checkpointing(model, attack=True) >= 1
    assert model.net.grad_checkpointing
    ckpt = _param_grads(model, x, y)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    disable_activation_checkpointing(model)
    assert not model.net.grad_checkpointing


def test_timm_checkpointing_update_mode_skips_the_attack_and_keeps_bn_statistics() -> None:
    torch.manual_seed(0)
    net = create_model("xcit_nano_12_p8_224", 10, MEAN, STD, dict(img_size=32, embed_dim=32, depth=2, num_heads=4),
                       channels_last=False).train()  # XCiT: BatchNorm inside its blocks (LPI)
    twin = copy.deepcopy(net)
    enable_activation_checkpointing(net, attack=False)
    x, y = images()
    seen = []
    hook = net.net.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(net.net.grad_checkpointing))
    pgd()(net, x, y)
    a, b = _param_grads(net, x, y), _param_grads(twin, x, y)
    hook.remove()
    assert seen[0] is False and seen[-1] is True  # off in the attack's passes, on in the update pass
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)
    sa, sb = state(net), state(twin)
    assert any("running_mean" in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # one BN update per forward, not two


def test_checkpointing_refuses_a_model_with_neither_or_with_pass_dependent_layers() -> None:
    with pytest.raises(ConfigError, match="no residual blocks .* and no timm set_grad_checkpointing"):
        enable_activation_checkpointing(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    mbn = create_model("xcit_nano_12_p8_224", 10, MEAN, STD, dict(img_size=32, embed_dim=32, depth=1, num_heads=4),
                       bn_domains=["clean", "adv"])  # Mixture BN routes by the pass's domain: not re-entered by timm
    with pytest.raises(ConfigError, match="would recompute MixtureBatchNorm2d outside the pass"):
        enable_activation_checkpointing(mbn)


# ---- BatchNorm-only features ----

def test_batchnorm_features_refuse_layernorm_models() -> None:
    with pytest.raises(ModelError, match=r"model.bn_domains .* needs BatchNorm layers, but ConvNeXt has none "
                                         r"\(LayerNorm, LayerNorm2d"):
        create_model("convnext_tiny", 10, MEAN, STD, dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
                     bn_domains=["clean", "adv"])
    with pytest.raises(ModelError, match="needs BatchNorm layers, but VisionTransformer has none"):
        create_model("test_vit", 10, MEAN, STD, bn_domains=["clean", "adv"])
    vit = tiny_vit()
    with pytest.raises(ModelError, match=r"schedule.bn_eval_last_epochs = 2 needs BatchNorm .* turn "
                                         r"schedule.bn_eval_last_epochs off"):
        require_batchnorm(vit, "schedule.bn_eval_last_epochs = 2")
    with pytest.raises(ModelError, match=r"dist.sync_bn needs BatchNorm layers.*turn dist.sync_bn off"):
        require_batchnorm(vit, "dist.sync_bn")
    require_batchnorm(tiny_bn_net(), "dist.sync_bn")  # BN models pass


# ---- digits twins train with PGD-3 in the loop ----

FAMILIES = {
    "convnext": ("convnext_tiny", {"drop_path_rate": 0.1, "ls_init_value": 1e-6}),
    "convnext_convstem": ("convnext_base_convstem", {"drop_path_rate": 0.1}),
    "vit": ("vit_small_patch16_224", {"drop_path_rate": 0.1}),
    "swin": ("swin_tiny_patch4_window7_224", {"drop_path_rate": 0.1}),
    "xcit": ("xcit_small_12_p16_224", {"drop_path_rate": 0.05}),
    "wrn50_2": ("wide_resnet50_2", {}),
}
FAST = ("convnext", "vit")


def preset(tmp_path: Path, arch: str, kwargs: dict) -> Path:
    """An ImageNet-scale preset of the Singh et al. 2023 shape (AdamW, PGD in the loop, 224 px)."""
    p = tmp_path / f"{arch}.yaml"
    p.write_text(yaml.safe_dump({
        "data": {"image_size": 224, "val_size": 224},
        "model": {"arch": arch, "kwargs": kwargs},
        "attack": {"name": "pgd", "eps": 4, "step": 2, "iters": 3, "targeted": False},
        "objective": {"name": "madry", "label_smoothing": 0.1},
        "optim": {"name": "adamw", "lr": 2e-3, "ref_batch": 64, "weight_decay": 0.05},
        "schedule": {"name": "constant", "epochs": 100, "warmup_epochs": 0}}))
    return p


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES])
def test_digits_twin_trains_20_steps_with_pgd3_and_its_loss_falls(family: str, digits_root: Path,
                                                                    tmp_path: Path) -> None:
    arch, kwargs = FAMILIES[family]
    cfg = load_config(preset(tmp_path, arch, kwargs), [
        f"data.root={digits_root}", f"run.out_dir={tmp_path}", "run.max_steps=20", "data.batch_size=64",
        "log.every_steps=1", "log.progress=false", "log.tensorboard=false", "eval.every_epochs=0",
        "eval.select_best=false", "eval.early_stop_patience=0", "run.export=false", "model.channels_last=false"],
        twin="digits")
    assert cfg.model.arch == arch and cfg.optim.name == "adamw" and cfg.attack.iters == 3
    assert all(cfg.model.kwargs[k] == v for k, v in kwargs.items())  # the preset's elements are kept
    res = main(cfg)
    assert res["step"] == 20
    rows = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)


def test_a_run_sets_the_stochastic_switch_and_refuses_bn_controls_without_bn(digits_root: Path,
                                                                            tmp_path: Path) -> None:
    """The config keys reach the parts: attack.stochastic_layers sets the attack-pass switch when the run is built,
    and schedule.bn_eval_last_epochs / dist.sync_bn on a LayerNorm model stop before any training step."""
    from atscale.training.run import build
    from conftest import tiny_overrides

    vit = {"model.arch": "test_vit", "model.kwargs": {"img_size": 32, "patch_size": 8}, "run.max_steps": 1}
    run = build(load_config(None, tiny_overrides(digits_root, tmp_path, "sw", **vit,
                                                 **{"attack.stochastic_layers": True})), torch.device("cpu"))
    assert stochastic_attack() and run.cfg.attack.stochastic_layers
    with evaluation():
        assert not stochastic_attack()
    build(load_config(None, tiny_overrides(digits_root, tmp_path, "sw2", **vit)), torch.device("cpu"))
    assert not stochastic_attack()
    for key, value in (("schedule.bn_eval_last_epochs", 1), ("dist.sync_bn", True)):
        cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "bn", **vit, **{key: value}))
        with pytest.raises(ModelError, match=f"{key}.* needs BatchNorm layers, but VisionTransformer has none"):
            main(cfg)
        assert not (tmp_path / "bn" / "checkpoints").exists() or not any((tmp_path / "bn" / "checkpoints").iterdir())
