"""Modern-recipe optimizer pieces (issue 16): AdamW with timm's no-decay rules, layer-wise lr decay, gradient
clipping; on a real (tiny) timm ViT and a real training run."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from atscale.checkpoint import load_checkpoint
from atscale.config import OptimCfg, load_config
from atscale.distributed.updater import DDPUpdater
from atscale.errors import ConfigError
from atscale.models import NormalizedModel
from atscale.train import main
from atscale.training.optim import build_optimizer, layer_decay_groups, param_groups
from conftest import tiny_overrides

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_vit() -> NormalizedModel:
    torch.manual_seed(0)
    return NormalizedModel(timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT), [0.5] * 3, [0.5] * 3)


def names_of(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_norms_biases_position_embedding_and_tokens() -> None:
    model = tiny_vit()
    decay, no_decay = param_groups(model, 0.05, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = names_of(model, no_decay["params"])
    assert {"net.pos_embed", "net.cls_token", "net.norm.weight", "net.head.bias"} <= nd
    assert {"net.head.weight", "net.patch_embed.proj.weight", "net.blocks.0.attn.qkv.weight"} <= \
        names_of(model, decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    everything = param_groups(model, 0.05, decay_norm_and_bias=True)
    assert len(everything[1]["params"]) == 0


def test_layer_decay_scales_lr_by_depth_from_the_head() -> None:
    model = tiny_vit()
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in names_of(model, g["params"])}
    assert len(scale) == len(list(model.parameters()))
    assert scale["net.head.weight"] == 1.0
    assert scale["net.blocks.1.mlp.fc1.weight"] == 2 * scale["net.blocks.0.mlp.fc1.weight"]  # one layer nearer
    assert scale["net.patch_embed.proj.weight"] == scale["net.pos_embed"] < scale["net.blocks.0.attn.qkv.weight"]
    wd = {n: g["weight_decay"] for g in groups for n in names_of(model, g["params"])}
    assert wd["net.pos_embed"] == 0.0 and wd["net.blocks.0.attn.qkv.weight"] == 0.05
    opt = build_optimizer(model, OptimCfg(name="adamw", lr=1e-3, layer_decay=0.5), global_batch=256)
    assert isinstance(opt, torch.optim.AdamW) and {g["lr_scale"] for g in opt.param_groups} == set(scale.values())


def test_layer_decay_needs_timm_layer_groups() -> None:
    with pytest.raises(ConfigError, match="optim.layer_decay=1"):
        layer_decay_groups(nn.Sequential(nn.Linear(2, 2)), 0.0, 0.7)


def test_clip_grad_norm_bounds_the_update() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    before = [p.detach().clone() for p in lin.parameters()]
    up = DDPUpdater(lin, torch.optim.SGD(lin.parameters(), lr=1.0), torch.device("cpu"), 1, None, clip_grad_norm=0.1)
    up.backward((lin(torch.randn(16, 8)) * 100).square().mean(), last=True)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(lin.parameters(), before)])
    assert torch.isclose(step.norm(), torch.tensor(0.1), rtol=1e-4)


def test_adamw_with_layer_decay_and_clipping_trains_a_vit(digits_root: Path, tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "vit", **{
        "model.arch": "vit_tiny_patch16_224", "model.kwargs": VIT, "optim.name": "adamw", "optim.lr": 1e-3,
        "optim.weight_decay": 0.05, "optim.layer_decay": 0.75, "optim.clip_grad_norm": 1.0, "run.max_steps": 3,
        "log.every_steps": 1})
    out = main(load_config(None, over))
    assert out["stopped"] and out["step"] == 3
    groups = load_checkpoint(tmp_path / "vit" / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    top = max(g["lr_scale"] for g in groups)
    base = next(g["lr"] for g in groups if g["lr_scale"] == top)
    assert base > 0 and len({g["lr_scale"] for g in groups}) == VIT["depth"] + 2
    for g in groups:  # the loop applies the scheduled lr times each group's scale
        assert g["lr"] == pytest.approx(base * g["lr_scale"] / top)


def test_fine_tuning_starts_from_a_checkpoint_or_an_export_and_resets_another_head(
        trained_digits_model, digits_root: Path, tmp_path: Path) -> None:
    """model.init_from: an atscale checkpoint (a tiny lr keeps the weights), its timm export, and a model with another
    class count (only the classifier is re-initialized)."""
    from atscale.checkpoint import init_from_pretrained
    from atscale.models import build_from_config
    from atscale.models.export import export_timm

    src_model, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    over = tiny_overrides(digits_root, tmp_path, "ft", **{"model.init_from": str(ckpt), "optim.lr": 1e-12,
                                                         "run.max_steps": 1, "attack.name": "none",
                                                         "objective.name": "clean"})
    main(load_config(None, over))
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["model"]
    for k, v in src_model.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(tuned[k], v, atol=1e-6), k

    export_timm(src_model, tmp_path / "export", mean=cfg.model.mean, std=cfg.model.std, input_size=32, crop_pct=1.0)
    four = build_from_config(cfg.model, 4)
    fresh_fc = four.net.fc.weight.detach().clone()
    assert init_from_pretrained(four, f"local-dir:{tmp_path / 'export'}") == ["fc.bias", "fc.weight"]
    assert torch.equal(four.net.conv1.weight, src_model.net.conv1.weight) and torch.equal(four.net.fc.weight, fresh_fc)
    vit = tiny_vit()
    with pytest.raises(Exception, match="does not fit model 'VisionTransformer'.*only the classifier may differ"):
        init_from_pretrained(vit, str(ckpt))


def test_frozen_layers_keep_their_weights_and_a_bad_prefix_is_refused(digits_root: Path, tmp_path: Path) -> None:
    from atscale.models import build_from_config

    over = tiny_overrides(digits_root, tmp_path, "frozen", **{"model.freeze": ["net.conv1", "net.layer1"],
                                                             "run.max_steps": 2})
    cfg = load_config(None, over)
    main(cfg)
    torch.manual_seed(cfg.run.seed)
    init = build_from_config(cfg.model, 10).state_dict()
    trained = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["model"]
    for k in ("net.conv1.weight", "net.layer1.0.conv1.weight", "net.layer1.1.bn2.weight"):
        assert torch.equal(trained[k], init[k]), k
    assert not torch.equal(trained["net.layer2.0.conv1.weight"], init["net.layer2.0.conv1.weight"])
    with pytest.raises(ConfigError, match=r"model.freeze names no parameters: \['net.conv9'\]"):
        main(load_config(None, tiny_overrides(digits_root, tmp_path, "bad", **{"model.freeze": ["net.conv9"]})))
