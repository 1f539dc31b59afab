"""The pre-processing defense presets (configs/cifar10/, issue 14) load, their digits twins keep the papers' elements,
and each twin trains one real step from a target / f_b of the twin's own architecture."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atscale.checkpoint import model_from_checkpoint
from atscale.config import load_config
from atscale.defenses import DefendedModel
from atscale.models import build_from_config
from atscale.models.export import export_timm
from atscale.train import main

PRESETS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "cifar10").glob("*.yaml"))
# one preset per kind of training in the default run; the others differ in numbers and sources the config checks
# of the test compare, and train behind `slow`
DEFAULT = ("trades_r18_cifar10", "jatp_nrp_trades_r18", "hgd_trades_r18", "fb_vgg_small_adv", "adv_transform_fb_clean",
           "arn_trades_r18", "ape_g_trades_r18")


def test_there_is_a_preset_per_defense_and_control() -> None:
    names = {p.stem for p in PRESETS}
    assert {"trades_r18_cifar10", "jatp_nrp_trades_r18", "jatp_joint_nrp_trades_r18", "nrp_static_trades_r18",
            "hgd_trades_r18", "fb_vgg_small_clean", "fb_vgg_small_adv", "adv_transform_fb_untrained",
            "adv_transform_fb_clean", "adv_transform_fb_adv", "arn_trades_r18", "ape_g_trades_r18"} <= names


def _export(model_cfg, folder: Path) -> str:
    export_timm(build_from_config(model_cfg, 10), folder, mean=model_cfg.mean, std=model_cfg.std, input_size=32)
    return f"local-dir:{folder}"


@pytest.mark.parametrize("preset", [pytest.param(p, id=p.stem, marks=[] if p.stem in DEFAULT else [pytest.mark.slow])
                                    for p in PRESETS])
def test_defense_preset_twin_trains_one_step(preset: Path, digits_root: Path, tmp_path: Path) -> None:
    full = load_config(preset)
    over = [f"data.root={digits_root}", f"run.out_dir={tmp_path}", "run.max_steps=1", "data.batch_size=16",
            "log.progress=false", "log.tensorboard=false", "eval.every_epochs=0", "run.export=false"]
    twin = load_config(preset, over, twin="digits")
    for sec in ("attack", "objective", "optim"):
        assert getattr(twin, sec) == getattr(full, sec), sec
    d, fd = twin.defense, full.defense
    assert (d.preprocessor, d.train, d.delta, d.iters, d.base_arch) == (fd.preprocessor, fd.train, fd.delta, fd.iters,
                                                                       fd.base_arch)
    assert d.kwargs.get("blocks") == fd.kwargs.get("blocks")  # NRP keeps its 3 basic blocks
    assert bool(d.base_from) == bool(fd.base_from) and bool(twin.model.init_from) == bool(full.model.init_from)
    if twin.model.init_from:  # the twin's target: runs/<target>_digits/...; here a fresh export of its architecture
        assert "_digits/" in twin.model.init_from
        over.append(f"model.init_from={_export(twin.model, tmp_path / 'target')}")
    if d.base_from:
        base = type(twin.model)(arch=d.base_arch, kwargs=d.base_kwargs, mean=twin.model.mean, std=twin.model.std)
        over.append(f"defense.base_from={_export(base, tmp_path / 'fb')}")
    cfg = load_config(preset, over, twin="digits")
    res = main(cfg)
    assert res["step"] == 1
    model, saved, _ = model_from_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", torch.device("cpu"))
    assert isinstance(model, DefendedModel) == bool(full.defense.preprocessor)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
