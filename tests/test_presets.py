"""Every published-protocol preset in configs/imagenet/ loads, validates, and its digits twin trains one real step with
the preset's elements in place (denoising blocks, activations, BN domains, GroupNorm, AutoAugment, RMSProp)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from atscale.config import ConfigError, load_config
from atscale.data.augment import AutoAugmentBatch
from atscale.checkpoint import model_from_checkpoint
from atscale.layers.activations import ACTIVATIONS
from atscale.layers.denoise import DenoiseBlock
from atscale.layers.mixture_bn import MixtureBatchNorm2d
from atscale.models.registry import ATSCALE_MODELS, base_model_args
from atscale.training.optim import lr_factor
from atscale.config.twins import digits_twin
from atscale.train import main

PRESETS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "imagenet").glob("*.yaml"))


def test_there_is_a_preset_per_paper_protocol() -> None:
    names = {p.stem for p in PRESETS}
    for needed in ("r152_iat", "r152_iat_denoise", "r152_mixed", "r152_mbn", "r152_gn_mixed", "r50_sat_relu",
                   "r50_sat_silu", "r50_sat_smoothrelu", "r50_sat_relu_softgrad_both", "advprop_efficientnet_b0",
                   "advprop_efficientnet_b7", "advprop_fg_efficientnet_b0", "advprop_resnet50", "r152_alp",
                   "r152_ratio", "r152_iat_bn_consistent", "fast_r50_eps2", "fast_r50_eps4", "free_r50_eps2",
                   "free_r50_eps4", "trades_r50_eps4", "trades_r50_eps8", "mart_r50_eps4", "mart_r50_eps8",
                   "liu2023_swin_b", "liu2023_swin_l", "liu2023_convnext_b", "liu2023_convnext_l",
                   "singh2023_convnext_b_convstem", "singh2023_convnext_l_convstem", "debenedetti2022_xcit_s12",
                   "debenedetti2022_xcit_m12", "debenedetti2022_xcit_l12", "advxl_vit_b", "advxl_vit_l",
                   "finetune_convnext_b_imagefolder"):
        assert needed in names


def _fine_tuning_source(cfg, tmp_path: Path) -> list[str]:
    """A fine-tuning twin starts from its source preset's twin: export a freshly built one of that architecture and
    point model.init_from at it, on the twin's own digits subset."""
    from atscale.models import build_from_config
    from atscale.models.export import export_timm

    assert cfg.model.init_from.startswith("local-dir:runs/") and "_digits/" in cfg.model.init_from
    assert cfg.data.digits_classes == [5, 6, 7, 8, 9]
    src = build_from_config(cfg.model, 10)
    export_timm(src, tmp_path / "source_export", mean=cfg.model.mean, std=cfg.model.std, input_size=32, crop_pct=1.0)
    return [f"model.init_from=local-dir:{tmp_path / 'source_export'}", f"data.root={tmp_path / 'digits_5to9'}",
            "data.source=digits"]


def _family(stem: str) -> str:
    """A preset's family: its name without the model-size or budget suffix (``_b3``, ``_l``, ``_m12``, ``_eps4``)."""
    return re.sub(r"_(b\d|[bl]|[sml]12|eps\d+)(?=_convstem$|$)", "", stem)


def _one_per_family() -> list:
    """Every preset, the first of each family in the default run and its size/budget siblings behind ``slow``: the
    siblings differ from it only in numbers the config checks above already compare."""
    seen: set[str] = set()
    params = []
    for p in PRESETS:
        fam = _family(p.stem)
        params.append(pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if fam in seen else []))
        seen.add(fam)
    return params


def _twin_keeping_the_papers_elements(preset: Path, digits_root: Path, tmp_path: Path):
    """Load a preset and its digits twin and check the twin keeps every training element of the paper's recipe."""
    full = load_config(preset)
    over = [f"data.root={digits_root}", f"run.out_dir={tmp_path}", "run.max_steps=1", "data.batch_size=16",
            "log.progress=false", "log.tensorboard=false", "eval.every_epochs=0", "log.every_steps=1",
            "eval.select_best=false", "eval.early_stop_patience=0"]
    cfg = load_config(preset, over, twin="digits")
    if full.model.init_from:
        cfg = load_config(preset, over + _fine_tuning_source(cfg, tmp_path), twin="digits")
    assert cfg.data.source == "digits" and cfg.data.image_size == 32
    for sec in ("attack", "objective", "optim"):
        assert getattr(cfg, sec) == getattr(full, sec), sec
    assert (cfg.model.bn_domains, cfg.model.eval_domain, cfg.data.autoaugment) == \
        (full.model.bn_domains, full.model.eval_domain, full.data.autoaugment)
    assert (cfg.data.mixup, cfg.data.randaugment_ops) == (full.data.mixup, full.data.randaugment_ops)
    keys = ("attack_iters", "attack_eps", "attack_step", "token_drop")
    assert [{k: ph.get(k) for k in keys} for ph in cfg.data.phases] == \
        [{k: ph.get(k) for k in keys} for ph in full.data.phases]
    assert cfg.schedule.name == full.schedule.name and cfg.schedule.epochs < full.schedule.epochs
    assert len(cfg.data.phases) == len(full.data.phases) and bool(cfg.schedule.bn_eval_last_epochs) == \
        bool(full.schedule.bn_eval_last_epochs)
    return full, cfg


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_twin_keeps_the_papers_elements(preset: Path, digits_root: Path, tmp_path: Path) -> None:
    _twin_keeping_the_papers_elements(preset, digits_root, tmp_path)


def test_families_group_only_size_and_budget_siblings() -> None:
    assert _family("advprop_efficientnet_b7") == _family("advprop_efficientnet_b0") == "advprop_efficientnet"
    assert _family("singh2023_convnext_l_convstem") == "singh2023_convnext_convstem"
    assert _family("fast_r50_eps4") == "fast_r50" and _family("debenedetti2022_xcit_m12") == "debenedetti2022_xcit"
    assert _family("r50_sat_relu_softgrad_both") != _family("r50_sat_relu_softgrad_attack")
    assert _family("liu2023_swin_b") == "liu2023_swin" != _family("liu2023_convnext_b")
    fams = {_family(p.stem) for p in PRESETS}
    assert sum(not p.marks for p in _one_per_family()) == len(fams)


@pytest.mark.parametrize("preset", _one_per_family())
def test_preset_twin_trains_one_step_with_the_papers_elements(preset: Path, digits_root: Path, tmp_path: Path) -> None:
    full, cfg = _twin_keeping_the_papers_elements(preset, digits_root, tmp_path)
    res = main(cfg)
    assert res["stopped"] and res["reason"] == "max_steps" and res["step"] == 1
    rows = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 1 and math.isfinite(train[0]["loss"])

    model, saved, _ = model_from_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", torch.device("cpu"))
    mods = list(model.modules())
    arch = full.model.arch
    if "denoise" in arch:
        assert any(isinstance(m, DenoiseBlock) for m in mods)
    act = full.model.kwargs.get("act") or (base_model_args(arch).get("act") if arch in ATSCALE_MODELS else None)
    if act:
        acts = [m for m in mods if isinstance(m, ACTIVATIONS[act])]
        assert acts and not any(type(m) is nn.ReLU for m in mods)
        mode = full.model.kwargs.get("act_kwargs", {}).get("grad_mode")
        assert mode is None or all(m.grad_mode == mode for m in acts)
    if full.model.bn_domains:
        mbn = [m for m in mods if isinstance(m, MixtureBatchNorm2d)]
        assert mbn and all(m.domains == tuple(full.model.bn_domains) for m in mbn)
        assert all(m.default == (full.model.eval_domain or full.model.bn_domains[0]) for m in mbn)
    if "groupnorm" in str(full.model.kwargs.get("norm_layer", "")):
        assert any(isinstance(m, nn.GroupNorm) for m in mods)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)
    if full.model.bn_momentum:
        bns = [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.momentum == full.model.bn_momentum for m in bns)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_twin_cli_flag_and_unknown_twin(tmp_path: Path) -> None:
    preset = PRESETS[0]
    with pytest.raises(ConfigError, match="--twin 'cifar' is unknown"):
        load_config(preset, twin="cifar")
    twin = digits_twin(load_config(preset))
    assert twin.run.name.endswith("_digits") and twin.data.root == "data/digits"


def test_fine_grained_advprop_needs_autoaugment_and_three_domains() -> None:
    base = ["objective.name=advprop_fg", "model.bn_domains=[clean, aug, adv]"]
    with pytest.raises(ConfigError, match="needs data.autoaugment"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"model.bn_domains: \[clean, aug, adv\]"):
        load_config(None, ["objective.name=advprop_fg", "model.bn_domains=[clean, adv]", "data.autoaugment=imagenet"])
    assert load_config(None, base + ["data.autoaugment=imagenet"]).objective.name == "advprop_fg"


def test_autoaugment_batch_is_per_image_reproducible_and_resumable() -> None:
    x = torch.rand(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    a, b = AutoAugmentBatch("imagenet", seed=3), AutoAugmentBatch("imagenet", seed=3)
    y1, y2 = a(x), b(x)
    assert torch.equal(y1, y2) and y1.shape == x.shape and y1.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= y1.min() and y1.max() <= 1
    q = (x * 255).round() / 255
    changed = [(not torch.allclose(y1[i], q[i], atol=1 / 255 + 1e-6)) for i in range(6)]
    assert sum(changed) >= 3  # sub-policies drawn per image; most images change
    state = a.state_dict()
    nxt = a(x)
    c = AutoAugmentBatch("imagenet", seed=3)
    c.load_state_dict(state)
    assert torch.equal(c(x), nxt) and not torch.equal(nxt, y1)
    with pytest.raises(ValueError, match="policy 'bogus' is unknown"):
        AutoAugmentBatch("bogus")


def test_exponential_schedule_is_efficientnets_staircase() -> None:
    cfg = load_config(None, ["schedule.name=exponential", "schedule.gamma=0.97", "schedule.decay_every_epochs=2.4",
                             "schedule.warmup_epochs=0"])
    spe = 100
    assert lr_factor(0, spe, cfg.schedule) == 1.0
    assert lr_factor(239, spe, cfg.schedule) == 1.0
    assert lr_factor(240, spe, cfg.schedule) == pytest.approx(0.97)
    assert lr_factor(24000, spe, cfg.schedule) == pytest.approx(0.97 ** 100)
