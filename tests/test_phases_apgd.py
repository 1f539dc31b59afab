"""Issue 16's remaining recipe pieces on real parts: the ARES step-only attack ramp (Liu et al. 2023), APGD-CE as the
training attack (Singh et al. 2023), LAMB, and AdvXL's two-stage phases (Wang et al. 2024: lower resolution, dropped
tokens and fewer attack steps first, then full resolution and more steps) with an exact resume inside stage 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from atscale.attacks import APGD, apgd_checkpoints, build_attack
from atscale.checkpoint import load_checkpoint
from atscale.config import AttackCfg, OptimCfg, load_config
from atscale.config.units import to_fraction
from atscale.errors import ConfigError
from atscale.models import NormalizedModel
from atscale.train import main
from atscale.training.controls import check_phase_batches, check_phases, patch_dropouts
from atscale.training.optim import build_optimizer
from atscale.training.schedule import plan_at
from conftest import tiny_overrides

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
DYNAMIC_VIT = {**VIT, "dynamic_img_size": True, "patch_drop_rate": 0.1}
TWO_STAGES = [{"until_epoch": 1, "image_size": 16, "batch_size": 512, "attack_iters": 1, "token_drop": 0.5},
              {"until_epoch": 2, "image_size": 32, "batch_size": 256, "attack_iters": 2}]


def _vit(**kw) -> NormalizedModel:
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**VIT, **kw})
    return NormalizedModel(net, [0.5] * 3, [0.5] * 3)


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_step_only_ramp_keeps_eps_and_grows_the_step() -> None:
    """ARES 2.0: PGD-3 at 4/255, step 8/(3*255) ramped over 5 epochs with eps fixed; eps_and_step ramps both."""
    over = ["attack.eps=4", f"attack.step={8 / 3}", "attack.iters=3", "attack.warmup_epochs=5"]
    ares = load_config(None, over + ["attack.warmup=step"])
    both = load_config(None, over + ["attack.warmup=eps_and_step"])
    eps, step = to_fraction(4), to_fraction(8 / 3)
    for epoch, k, f in [(0, 0, 0.0), (1, 5, 0.3), (2, 5, 0.5), (4, 9, 0.98), (5, 0, 1.0), (9, 3, 1.0)]:
        a = plan_at(ares, epoch, k, 10, 1.0, eps, step)
        b = plan_at(both, epoch, k, 10, 1.0, eps, step)
        assert a.eps == eps and a.step == pytest.approx(max(step * f, 1e-12), rel=1e-12, abs=0)
        assert b.eps == pytest.approx(eps * f, rel=1e-12, abs=0) and b.step == a.step
        assert a.lr == b.lr and a.epoch == epoch + k / 10


def test_lr_is_a_function_of_the_fractional_epoch_whatever_the_steps_per_epoch() -> None:
    """Phases with other batch sizes change the steps per epoch; the schedule's factor follows the epoch."""
    cfg = load_config(None, ["schedule.name=cosine", "schedule.warmup_epochs=0.5", "schedule.epochs=4"])
    for spe_a, spe_b in [(5, 11), (2, 7)]:
        for epoch in (1, 2, 3):
            a, b = plan_at(cfg, epoch, 0, spe_a, 1.0, 0, 1), plan_at(cfg, epoch, 0, spe_b, 1.0, 0, 1)
            assert a.lr == pytest.approx(b.lr) == pytest.approx(0.5 * (1 + math.cos(math.pi * (epoch - 0.5) / 3.5)))
    warm_a, warm_b = plan_at(cfg, 0, 2, 10, 1.0, 0, 1), plan_at(cfg, 0, 4, 20, 1.0, 0, 1)
    assert warm_a.epoch == warm_b.epoch == 0.2
    assert warm_a.lr == pytest.approx(3 / 5) and warm_b.lr == pytest.approx(5 / 10)


def test_apgd_checkpoints_for_one_and_two_steps_and_passes_per_call() -> None:
    """1 step: no checkpoint; 2 steps: w_1 = 1 (Singh et al.'s n_iter_2 = max(int(0.22 * 2), 1) = 1). N steps cost N
    forward-backward passes and one forward without gradient at the last iterate; none more."""
    assert apgd_checkpoints(1) == [] and apgd_checkpoints(2) == [1] and apgd_checkpoints(3) == [1, 2]
    model = _vit()
    passes = []
    model.register_forward_hook(lambda m, i, o: passes.append(torch.is_grad_enabled()))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    for iters in (1, 2, 5):
        atk = APGD(4 / 255, iters, clean_start_prob=1.0, seed=0)
        passes.clear()
        x_adv = atk(model, x, y)
        assert passes == [True] * iters + [False], iters
        assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and atk.checkpoints == apgd_checkpoints(iters)
    atk.iters = 2  # a training phase changes the iterations: the checkpoints follow
    assert atk.checkpoints == [1]


def test_apgd_as_training_attack_budget_soft_labels_and_config_errors() -> None:
    cfg = load_config(None, ["attack.name=apgd", "attack.eps=4", "attack.iters=2", "attack.targeted=false",
                             "attack.clean_start_prob=1"])
    atk = build_attack(cfg.attack, seed=3)
    assert isinstance(atk, APGD) and atk.iters == 2 and atk.eps == to_fraction(4) and not atk.targeted
    assert atk.loss == "ce" and atk.seed == 3 and atk.clean_start_prob == 1.0
    atk.set_budget(to_fraction(2), 123.0)  # eps warmup: eps scales, the step is APGD's own 2 eps
    assert atk.eps == to_fraction(2) and atk.step == 2 * to_fraction(2)
    model, x = _vit(), torch.rand(6, 3, 32, 32)
    soft = torch.full((6, 10), 0.02).scatter(1, torch.arange(6)[:, None], 0.82)  # Mixup-like soft targets
    res = atk.perturb(model, x, soft)
    assert res.success is not None and res.success.shape == (6,) and (res.x_adv - x).abs().max() <= atk.eps + 1e-6
    with pytest.raises(ConfigError, match="attack.warmup=eps_and_step"):  # refused when the config loads
        load_config(None, ["attack.name=apgd", "attack.warmup=step", "attack.warmup_epochs=2"])
    step_ramp = AttackCfg(name="apgd", eps=4, warmup="step", warmup_epochs=2)
    with pytest.raises(ConfigError, match="attack.warmup=eps_and_step"):  # and by the builder itself
        build_attack(step_ramp)
    with pytest.raises(ConfigError, match="drop attack_step"):
        check_phases([{"until_epoch": 1, "attack_step": 1}], model, "apgd", atk)


def test_apgd_training_run_with_eps_warmup_has_finite_loss_and_round_trips_its_state(
        digits_root: Path, tmp_path: Path) -> None:
    """Singh et al.'s training attack (2-step APGD-CE, untargeted, from the clean image) with an eps warmup, in a real
    run; the checkpoint carries the attack's generator, and a loaded copy draws the same starts."""
    over = tiny_overrides(digits_root, tmp_path, "apgd", **{
        "attack.name": "apgd", "attack.iters": 2, "attack.eps": 8, "attack.clean_start_prob": 0.5,
        "attack.warmup_epochs": 0.2, "run.max_steps": 6, "log.every_steps": 1})
    out = main(load_config(None, over))
    assert out["stopped"] and out["step"] == 6
    train = _rows(tmp_path / "apgd", "train")
    assert all(math.isfinite(r["loss"]) for r in train) and len(train) == 6
    eps = [r["eps"] for r in train]
    assert eps[0] == 0 and 0 < eps[2] < 8 and eps[-1] == pytest.approx(8)  # 22 steps per epoch: full from step 5
    state = load_checkpoint(tmp_path / "apgd" / "checkpoints" / "last.pt")["attack"]
    assert "gen" in state
    a, b = APGD(8 / 255, 2, clean_start_prob=0.5, seed=9), APGD(8 / 255, 2, clean_start_prob=0.5, seed=1)
    a.load_state_dict(state)
    b.load_state_dict(state)
    model, x, y = _vit(), torch.rand(4, 3, 32, 32), torch.arange(4)
    assert torch.equal(a(model, x, y), b(model, x, y))


def test_lamb_uses_adamw_param_groups_betas_and_eps() -> None:
    model = _vit()
    cfg = OptimCfg(name="lamb", lr=2e-3, weight_decay=0.05, betas=[0.8, 0.99], adam_eps=1e-7)
    opt = build_optimizer(model, cfg, global_batch=512)
    assert isinstance(opt, timm.optim.Lamb) and opt.defaults["max_grad_norm"] is None
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"net.pos_embed", "net.cls_token", "net.norm.weight"} <= {names[id(p)] for p in no_decay["params"]}
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-7 and g["lr"] == 4e-3 for g in opt.param_groups)
    layered = build_optimizer(model, OptimCfg(name="lamb", layer_decay=0.5), global_batch=256)
    assert len({g["lr_scale"] for g in layered.param_groups}) == VIT["depth"] + 2
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(2, 3, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_phase_errors_name_the_fix() -> None:
    strict, dyn = _vit(), _vit(dynamic_img_size=True)
    pgd = build_attack(load_config(None, []).attack)
    with pytest.raises(ConfigError, match="patch_drop_rate"):
        check_phases([{"until_epoch": 1, "token_drop": 0.5}], dyn, "pgd", pgd)
    with pytest.raises(ConfigError, match="dynamic_img_size=true"):
        check_phases([{"until_epoch": 1, "image_size": 16}], strict, "pgd", pgd)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        check_phases([{"until_epoch": 1, "image_size": 20}], dyn, "pgd", pgd)
    with pytest.raises(ConfigError, match="attack.name = pgd"):
        check_phases([{"until_epoch": 1, "attack_iters": 3}], dyn, "fgsm", pgd)
    with pytest.raises(ConfigError, match="no attack"):
        check_phases([{"until_epoch": 1, "attack_eps": 4}], dyn, "none", build_attack(load_config(
            None, ["attack.name=none"]).attack))
    with pytest.raises(ConfigError, match="lower the phase's batch_size"):
        check_phase_batches([{"until_epoch": 1}, {"until_epoch": 2, "batch_size": 600}], 1000, 2)
    check_phase_batches([{"until_epoch": 1, "batch_size": 500}], 1000, 2)
    check_phases([{"until_epoch": 1, "image_size": 16}, {"until_epoch": 2, "image_size": 32}], dyn, "pgd", pgd)
    assert patch_dropouts(dyn) == [] and len(patch_dropouts(_vit(patch_drop_rate=0.1))) == 1


def _two_stage(root: Path, out: Path, name: str, **extra: object) -> list[str]:
    return tiny_overrides(root, out, name, **{
        "model.arch": "vit_tiny_patch16_224", "model.kwargs": DYNAMIC_VIT, "optim.name": "lamb", "optim.lr": 2e-3,
        "optim.weight_decay": 0.05, "schedule.epochs": 2, "attack.iters": 3, "attack.warmup_epochs": 0.5,
        "data.phases": TWO_STAGES, "eval.max_images": 50, "eval.steps": [1], "log.every_steps": 1, **extra})


def test_phase_settings_reach_the_attack_and_the_patch_dropout(digits_root: Path, tmp_path: Path) -> None:
    from atscale.training.run import build

    run = build(load_config(None, _two_stage(digits_root, tmp_path, "apply")), torch.device("cpu"))
    (drop,) = patch_dropouts(run.model)
    seen = []
    for epoch in (0, 1, 0):
        run.epoch = epoch
        loader = run.train_loader()
        loader.set_epoch(epoch)
        x, _ = next(iter(loader))
        run.apply(run.plan(0, run.steps_per_epoch(loader)))
        seen.append((tuple(x.shape), run.attack.iters, drop.prob, run.steps_per_epoch(loader), run.peak_lr()))
    assert seen[0] == seen[2] == ((512, 3, 16, 16), 1, 0.5, 2, 2e-3 * 512 / 256)
    assert seen[1] == ((256, 3, 32, 32), 2, 0.1, 5, 2e-3)  # stage 2: the run's patch_drop_rate again
    run.model.train()
    tokens = []
    run.model.net.blocks[0].register_forward_hook(lambda m, i, o: tokens.append(o.shape[1]))
    run.epoch = 0
    run.train_loader()
    run.apply(run.plan(0, 2))
    run.model(x[:2, :, :16, :16])
    assert tokens == [1 + 2]  # class token + half of the 4 patches of a 16 px image


def test_two_stage_vit_with_resize_attack_steps_and_token_drop_resumes_exactly_in_stage_two(
        digits_root: Path, tmp_path: Path) -> None:
    """AdvXL's two stages on a tiny ViT (16 px, half the tokens, PGD-1, batch 512; then 32 px, all tokens, PGD-2,
    batch 256) with LAMB: stopped in the middle of stage 2 and resumed, the final weights equal the uninterrupted
    run's; the lr follows the fractional epoch with the peak of each stage's batch."""
    steps = 1438 // 512 + 1438 // 256  # max_steps = the whole run: its last step, without the final evaluation
    full = main(load_config(None, _two_stage(digits_root, tmp_path, "full", **{"run.max_steps": steps})))
    part = main(load_config(None, _two_stage(digits_root, tmp_path, "split", **{"run.max_steps": 4})))
    assert full["step"] == steps and part["step"] == 4
    ck = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert (ck["epoch"], ck["batch"]) == (1, 2)
    main(load_config(None, _two_stage(digits_root, tmp_path, "split", **{"run.resume": "auto",
                                                                         "run.max_steps": steps})))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == steps and a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    train = _rows(tmp_path / "full", "train")
    for r in train:
        peak = 2e-3 * (512 if r["epoch"] < 1 else 256) / 256
        t = max(0.0, (r["epoch"] - 0.5) / 1.5)
        factor = (r["epoch"] + (1 / 2 if r["epoch"] < 1 else 1 / 5)) / 0.5 if r["epoch"] < 0.5 else \
            0.5 * (1 + math.cos(math.pi * t))
        assert r["lr"] == pytest.approx(peak * factor), r
    resumed = [r for r in _rows(tmp_path / "split", "train") if r["step"] > 4]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in train if r["step"] > 4]
