"""timm registrations of the papers' architectures (atscale.models.registry): every registered name builds, trains a
step, and survives export (save_for_hf) + ``local-dir:`` reload with identical logits; denoise/activation/depth
structure; grad checkpointing; error messages."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

import atscale.models.registry as registry
from atscale.models.export import export_timm
from atscale.layers.activations import ACTIVATIONS, get_act_layer
from atscale.layers.denoise import DenoiseBlock, MeanFilter, NonLocalMeans
from atscale.models.normalize import NormalizedModel
from atscale.models.registry import (ACT_MODELS, ATSCALE_MODELS, DEEP_MODELS, DEEP_RESNET_LAYERS, DENOISE_MODELS,
                                     base_model_args)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY = {"channels": [8, 16, 32, 64]}
REQUIRED = {"resnet152_denoise", "resnet152_denoise_all", "resnext101_32x8d_denoise", "resnext101_32x8d_denoise_all",
            "resnet50_denoise", "resnet50_silu", "resnet50_softplus", "resnet50_psoftplus", "resnet50_gelu",
            "resnet50_elu", "resnet50_celu", "resnet50_smoothrelu", "resnet152_silu", "resnext152_32x8d_silu",
            "resnet338", "resnet638"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core CPU two spinning OpenMP threads make
    each step up to 100x slower; restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_kwargs(name: str) -> dict:
    """Small widths (ResNeXt 32x4d needs 16 base channels for a nonzero group width); the registered depth except
    for the deep ResNets (their default depth is checked on the meta device)."""
    layers = [1, 1, 2, 1] if name in DEEP_MODELS else list(base_model_args(name)["layers"])
    return {"channels": [16, 32, 64, 128] if "32x4d" in name else TINY["channels"], "layers": layers}


def build(name: str, **kwargs) -> ResNet:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **{**tiny_kwargs(name), **kwargs})


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def perturb(net: nn.Module, seed: int = 1) -> None:
    """Move every weight off its initial value (denoise BN gammas start at zero, i.e. the identity) and give the BNs
    running statistics of 32 images that include the test images, as training would (eval-mode activations
    overflow through 33 cubic dot-product denoising blocks otherwise)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()((images(32) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    net.train(was_training)
    for m in bns:
        m.momentum = 0.1


def count_blocks(net: nn.Module) -> int:
    return sum(isinstance(m, Bottleneck) for m in net.modules())


def test_registered_names() -> None:
    assert REQUIRED <= set(ATSCALE_MODELS)
    assert len(set(ATSCALE_MODELS)) == len(ATSCALE_MODELS)
    for name in ATSCALE_MODELS:
        assert timm.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == "atscale.models.registry", name
        assert timm.models.get_pretrained_cfg(name).architecture == name
    assert not {"resnet50", "resnet152", "resnet200", "resnext101_32x8d"} & set(ATSCALE_MODELS)
    assert set(DENOISE_MODELS) == {n for n in ATSCALE_MODELS if "denoise" in n}
    assert set(DEEP_MODELS) == {"resnet338", "resnet638"}


def export_and_reload(net: ResNet, folder: Path) -> tuple[dict, ResNet]:
    """Export like ``atscale export`` and reload with plain ``timm.create_model('local-dir:...')``; eval-mode logits
    on [0, 1] images normalized the timm way (from the reloaded pretrained_cfg) must equal ours."""
    model = NormalizedModel(net, MEAN, STD).eval()
    out = export_timm(model, folder, mean=MEAN, std=STD, input_size=32, crop_pct=1.0)
    conf = json.loads((out / "config.json").read_text())
    assert "grad_checkpointing" not in conf["model_args"]
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(plain) is type(net) and not plain.grad_checkpointing
    assert list(plain.state_dict()) == list(net.state_dict())
    data_cfg = timm.data.resolve_data_config({}, model=plain)
    mean = torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(1, 3, 1, 1)
    x = images()
    with torch.no_grad():
        ours = model(x)
        theirs = plain((x - mean) / std)
    assert torch.isfinite(ours).all() and ours.std() > 0
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    return conf, plain


@pytest.mark.parametrize("name", ATSCALE_MODELS)
def test_train_step_export_and_local_dir_reload(name: str, tmp_path: Path) -> None:
    net = build(name, grad_checkpointing=True)
    assert net.grad_checkpointing
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    NormalizedModel(net, MEAN, STD).train()(x).logsumexp(1).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    perturb(net)
    conf, _ = export_and_reload(net, tmp_path / "exported")
    assert conf["architecture"] == name and conf["num_classes"] == 5
    assert {k: conf["model_args"][k] for k in ("channels", "layers")} == tiny_kwargs(name)


@pytest.mark.parametrize("name, kwargs, module_type", [
    ("resnet50_denoise", {"denoise_op": "median"}, "MedianFilter"),  # same state_dict keys as "mean"
    ("resnet152_denoise_all", {"denoise_op": "mean"}, "MeanFilter"),
    ("resnet338", {"act": "psoftplus", "act_kwargs": {"alpha": 3.0}}, "ParametricSoftplus"),
])
def test_non_default_kwargs_round_trip(name: str, kwargs: dict, module_type: str, tmp_path: Path) -> None:
    net = build(name, **kwargs)
    perturb(net)
    conf, plain = export_and_reload(net, tmp_path / "exported")
    assert {k: conf["model_args"][k] for k in kwargs} == kwargs
    assert any(type(m).__name__ == module_type for m in plain.modules())


@pytest.mark.parametrize("name", DENOISE_MODELS)
def test_denoise_blocks_are_built_in(name: str) -> None:
    net = timm.create_model(name, num_classes=5, **TINY)
    base = base_model_args(name)
    blocks = [m for m in net.modules() if isinstance(m, DenoiseBlock)]
    if base["denoise_placement"] == "stage_end":
        assert len(blocks) == 4
    else:
        assert len(blocks) == sum(base["layers"]) == count_blocks(net)
    assert all(b.op_name == base["denoise_op"] for b in blocks)
    last = base["layers"][0] - 1
    assert f"layer1.denoise{last}.bn.weight" in net.state_dict()
    assert all(not b.bn.weight.any() for b in blocks)
    if name == "resnet152_denoise_all":
        assert all(b.op.subsample and b.op.kind == "gaussian" for b in blocks)
    if name == "resnext101_32x8d_denoise_all":
        assert all(not b.op.subsample and not b.op.embed and b.op.kind == "dot" for b in blocks)


def test_denoise_kwargs_select_the_op_on_any_registered_model() -> None:
    net = timm.create_model("resnet152_denoise_all", num_classes=5, denoise_op="mean", **TINY)
    blocks = [m for m in net.modules() if isinstance(m, DenoiseBlock)]
    assert len(blocks) == 50 and all(isinstance(b.op, MeanFilter) for b in blocks)

    net = timm.create_model("resnet50_denoise", num_classes=5, denoise_op="dot", denoise_embed=True,
                            denoise_placement="every_block", denoise_subsample=True, denoise_use_conv=False,
                            denoise_residual=False, **TINY)
    blocks = [m for m in net.modules() if isinstance(m, DenoiseBlock)]
    assert len(blocks) == 16
    b = blocks[0]
    assert isinstance(b.op, NonLocalMeans) and b.op.embed and b.op.subsample and b.op.kind == "dot"
    assert isinstance(b.conv, nn.Identity) and not b.residual

    net = timm.create_model("resnet338", num_classes=5, layers=[1, 1, 1, 1], denoise_op="median", **TINY)
    assert sum(isinstance(m, DenoiseBlock) for m in net.modules()) == 4
    net = timm.create_model("resnet50_silu", num_classes=5, **TINY)
    assert not any(isinstance(m, DenoiseBlock) for m in net.modules())


@pytest.mark.parametrize("name", ACT_MODELS)
def test_activation_variants(name: str) -> None:
    net = timm.create_model(name, num_classes=5, **tiny_kwargs(name))
    cls = ACTIVATIONS[base_model_args(name)["act"]]
    acts = [m for m in net.modules() if isinstance(m, cls)]
    assert len(acts) == 1 + 3 * count_blocks(net)
    assert not any(type(m) is nn.ReLU for m in net.modules())
    if name == "resnet50_smoothrelu":
        assert sum(k.endswith("alpha_raw") for k in net.state_dict()) == len(acts)


def test_act_kwarg_overrides_the_activation() -> None:
    net = timm.create_model("resnet152_denoise", num_classes=5, act="gelu", **TINY)
    assert any(isinstance(m, ACTIVATIONS["gelu"]) for m in net.modules())
    assert not any(type(m) is nn.ReLU for m in net.modules())
    net = timm.create_model("resnet50_psoftplus", num_classes=5, act_kwargs={"alpha": 3.0}, **TINY)
    assert {m.alpha for m in net.modules() if isinstance(m, ACTIVATIONS["psoftplus"])} == {3.0}
    net = timm.create_model("resnet50_silu", num_classes=5, act_layer=nn.ReLU, **TINY)
    assert any(type(m) is nn.ReLU for m in net.modules())
    assert not any(isinstance(m, nn.SiLU) for m in net.modules())


def test_denoise_fused_is_a_runtime_switch_with_the_same_function() -> None:
    fused = registry.resnet50_denoise(num_classes=5, **TINY).eval()
    explicit = registry.resnet50_denoise(num_classes=5, denoise_fused=False, **TINY).eval()
    ops = [m for m in explicit.modules() if type(m).__name__ == "NonLocalMeans"]
    assert len(ops) == 4 and not any(op.fused for op in ops)
    assert "denoise_fused" not in explicit._model_args
    perturb(fused)  # nonzero denoise-block BN gammas: the non-local ops then shape the output
    explicit.load_state_dict(fused.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), fused(x), rtol=1e-4, atol=1e-5)


def test_direct_entrypoint_call_records_model_args() -> None:
    net = registry.resnet50_denoise(num_classes=5, denoise_op="mean", act="celu", grad_checkpointing=True, **TINY)
    assert net._model_args == {"num_classes": 5, "denoise_op": "mean", "act": "celu", **TINY}
    assert net.grad_checkpointing


def test_deep_resnets_have_the_paper_depths() -> None:
    """Xie thesis Sec 6.5: ResNet-338 / ResNet-638; depth = stem conv + 3 convs per bottleneck + fc."""
    for name, depth in (("resnet338", 338), ("resnet638", 638)):
        layers = DEEP_RESNET_LAYERS[name]
        assert tuple(base_model_args(name)["layers"]) == layers
        assert 3 * sum(layers) + 2 == depth
        net = timm.create_model(name, device="meta")
        assert next(net.parameters()).is_meta
        assert tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5)) == layers
        main_path_convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
        assert len(main_path_convs) + 1 == depth
    assert DEEP_RESNET_LAYERS == {"resnet338": (3, 24, 82, 3), "resnet638": (3, 24, 182, 3)}


@pytest.mark.parametrize("name", ["resnet50_denoise", "resnet50_smoothrelu"])
def test_grad_checkpointing_gives_the_same_gradients(name: str) -> None:
    ref = build(name, layers=[1, 1, 1, 1]).train()
    perturb(ref)
    ckpt = build(name, layers=[1, 1, 1, 1], grad_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    assert ckpt.grad_checkpointing and not ref.grad_checkpointing
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for net in (ref, ckpt):
        net(x).logsumexp(1).sum().backward()
    grads = dict(ckpt.named_parameters())
    for pname, p in ref.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, rtol=1e-5, atol=1e-6, msg=pname)


@pytest.mark.parametrize("kwargs, match", [
    ({"denoise_op": "gauss"}, "denoise_op 'gauss' is unknown; allowed: gaussian, dot"),
    ({"denoise_placement": "everywhere"}, "denoise_placement 'everywhere' is unknown"),
    ({"denoise_op": "mean", "denoise_subsample": True}, "subsample"),
    ({"act": "swish"}, "unknown activation 'swish'"),
    ({"act": "psoftplus", "act_kwargs": {"beta": 2}}, "takes no argument"),
    ({"act": "silu", "act_layer": nn.ReLU}, "not both"),
    ({"act_kwargs": {"alpha": 2.0}}, "need act"),
    ({"act": "relu_psoftplus_grad", "act_kwargs": {"grad_mode": "attack"}, "grad_checkpointing": True},
     "grad_checkpointing"),
])
def test_bad_kwargs_raise_clear_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timm.create_model("resnet50_denoise", num_classes=5, **TINY, **kwargs)


def test_denoise_kwargs_without_an_op_are_refused() -> None:
    with pytest.raises(ValueError, match="need denoise_op"):
        timm.create_model("resnet638", denoise_placement="every_block")


def test_efficientnet_takes_our_activations_as_act_layer(tmp_path: Path) -> None:
    """Xie thesis Sec 5.5.2: timm's EfficientNets (SiLU by default) accept get_act_layer(...) as act_layer; a class
    is not JSON, so save_for_hf refuses to export it (documented in the registry module)."""
    net = timm.create_model("efficientnet_b0", num_classes=5, act_layer=get_act_layer("smoothrelu")).eval()
    assert any(isinstance(m, ACTIVATIONS["smoothrelu"]) for m in net.modules())
    assert not any(isinstance(m, (nn.SiLU, nn.ReLU)) for m in net.modules())
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="act_layer"):
        export_timm(NormalizedModel(net, MEAN, STD), tmp_path / "e", mean=MEAN, std=STD, input_size=32)


def test_import_twice_and_reload_without_warnings() -> None:
    code = ("import importlib, warnings, timm\nimport atscale.models.registry as r\nimport atscale.models.registry\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); n = r.ATSCALE_MODELS; importlib.reload(r)\n"
            "assert r.ATSCALE_MODELS == n and not w, [str(x.message) for x in w]\n"
            "timm.create_model('resnet50_silu', channels=[8, 16, 32, 64])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
