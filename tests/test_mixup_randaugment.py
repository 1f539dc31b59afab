"""Mixup / CutMix with adversarial training and RandAugment on device (the ARES 2.0 robust_training recipe, Liu et al.
2023): the attack's labels and the loss's soft targets are the documented ones, label smoothing enters once, every
cross-entropy objective takes soft targets, RandAugment draws are seeded per image, and a resumed run with both is
exact. Real timm models and real FFCV digits batches throughout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atscale.attacks import PGD
from atscale.checkpoint import load_checkpoint
from atscale.config import load_config
from atscale.config.schema import MIXUP_OBJECTIVES, MixupCfg, ObjectiveCfg
from atscale.data.augment import RandAugmentBatch
from atscale.errors import ConfigError
from atscale.models import create_model
from atscale.train import main
from atscale.training.loop import train_epoch
from atscale.training.mixing import Mixing
from atscale.training.objectives import Madry, build_objective
from atscale.training.run import build
from conftest import TINY_MODEL, tiny_overrides

K = 10


def smoothed(y: torch.Tensor, s: float, k: int = K) -> torch.Tensor:
    """The label-smoothed one-hot target of Szegedy et al. 2016: 1 - s + s/K on the label, s/K elsewhere."""
    return F.one_hot(y, k).float() * (1 - s) + s / k


def tiny_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(TINY_MODEL["arch"], K, TINY_MODEL["mean"], TINY_MODEL["std"], TINY_MODEL["kwargs"], **kw)


# ------------------------------------------------------------------------------------------------ RandAugment

def test_randaugment_batch_is_seeded_per_image_and_resumable() -> None:
    torch.manual_seed(5)
    img = torch.rand(1, 3, 32, 32)
    x = img.expand(8, -1, -1, -1).contiguous(memory_format=torch.channels_last)  # eight copies of one image
    rng = torch.get_rng_state()
    a, b = RandAugmentBatch(2, 9, seed=3), RandAugmentBatch(2, 9, seed=3)
    y1 = a(x)
    assert torch.equal(torch.get_rng_state(), rng)  # draws come from a fork: the global stream is untouched
    assert torch.equal(y1, b(x)) and y1.shape == x.shape and y1.dtype == torch.float32
    assert y1.is_contiguous(memory_format=torch.channels_last) and 0 <= y1.min() and y1.max() <= 1
    assert RandAugmentBatch(2, 9, seed=3)(x.contiguous()).is_contiguous()
    distinct = {tuple(y1[i].flatten()[::97].tolist()) for i in range(8)}
    assert len(distinct) >= 5  # the same image gets independent draws per position
    assert not torch.equal(RandAugmentBatch(2, 9, seed=4)(x), y1)
    state = a.state_dict()
    nxt = a(x)
    c = RandAugmentBatch(2, 9, seed=3)
    c.load_state_dict(state)
    assert state == {"calls": 1} and torch.equal(c(x), nxt) and not torch.equal(nxt, y1)


def test_randaugment_magnitude_zero_and_bad_settings() -> None:
    x = (torch.rand(4, 3, 16, 16) * 255).round() / 255
    strong = RandAugmentBatch(3, 30, seed=0)(x)
    assert not torch.equal(strong, x)
    with pytest.raises(ConfigError, match="data.randaugment_magnitude = 31"):
        RandAugmentBatch(2, 31)
    with pytest.raises(ConfigError, match="data.randaugment_ops = 0"):
        RandAugmentBatch(0, 9)


# ------------------------------------------------------------------------------------------------ mixing

def test_mixup_soft_targets_are_lam_weighted_and_smoothed_once() -> None:
    """Zhang et al. 2018: x~ = lam x_i + (1 - lam) x_j and y~ = lam y_i + (1 - lam) y_j, with j = B-1-i (timm); the
    targets carry objective.label_smoothing once; hard = argmax; the attack gets soft or hard as configured."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, K, (8,))
    s, saved, x0 = 0.1, np.random.get_state(), x.clone()
    mixing = Mixing(MixupCfg(mixup_alpha=0.8), K, label_smoothing=s, attack_labels="soft", seed=11)
    out = mixing(x, y)
    assert np.array_equal(np.random.get_state()[1], saved[1])  # numpy's global stream is untouched
    xf = x.flip(0)
    i = (x - xf).abs().argmax()
    lam = ((out.x.flatten()[i] - xf.flatten()[i]) / (x.flatten()[i] - xf.flatten()[i])).item()
    assert 0 < lam < 1 and torch.allclose(out.x, lam * x + (1 - lam) * xf, atol=1e-5)
    expect = lam * smoothed(y, s) + (1 - lam) * smoothed(y.flip(0), s)
    torch.testing.assert_close(out.soft, expect, atol=1e-5, rtol=0)
    assert torch.equal(out.hard, out.soft.argmax(1)) and out.attack is out.soft
    assert torch.equal(x, x0) and not torch.equal(out.x, x)  # the input batch is not mixed in place

    again = Mixing(MixupCfg(mixup_alpha=0.8), K, label_smoothing=s, attack_labels="hard", seed=11)
    first = again(x, y)
    assert torch.equal(first.x, out.x) and torch.equal(first.attack, out.hard)  # (seed, calls) decide the draw
    second = again(x, y)
    resumed = Mixing(MixupCfg(mixup_alpha=0.8), K, label_smoothing=s, attack_labels="hard", seed=11)
    resumed.load_state_dict(again.state_dict())
    assert not torch.equal(second.x, first.x) and not torch.equal(resumed(x, y).x, second.x)
    resumed.load_state_dict({"calls": 1})
    assert torch.equal(resumed(x, y).x, second.x)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area() -> None:
    """Yun et al. 2019: a box of the mirror image is pasted; lam = 1 - box area / image area (timm's correct_lam)."""
    torch.manual_seed(1)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    out = Mixing(MixupCfg(cutmix_alpha=1.0), K, seed=2)(x, y)
    pasted = (out.x != x).any(1)  # [B, H, W] pixels that came from the mirror image
    assert torch.equal(out.x[pasted.unsqueeze(1).expand_as(x)], x.flip(0)[pasted.unsqueeze(1).expand_as(x)])
    lam = 1 - pasted[0].float().mean().item()
    assert 0 < lam < 1
    torch.testing.assert_close(out.soft, lam * smoothed(y, 0.0) + (1 - lam) * smoothed(y.flip(0), 0.0),
                               atol=1e-6, rtol=0)


def test_mixing_refuses_odd_batches_and_bad_settings(digits_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch of 5 images"):
        Mixing(MixupCfg(mixup_alpha=1.0), K)(torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="data.mixup.cutmix_alpha = -1"):
        Mixing(MixupCfg(mixup_alpha=1.0, cutmix_alpha=-1.0), K)
    with pytest.raises(ConfigError, match="data.mixup.prob = 1.5"):
        Mixing(MixupCfg(mixup_alpha=1.0, prob=1.5), K)
    with pytest.raises(ConfigError, match=r"needs even batch sizes \(data.batch_size = 63\)"):
        load_config(None, tiny_overrides(digits_root, tmp_path, "odd", **{
            "data.batch_size": 63, "data.mixup.mixup_alpha": 0.8}))
    with pytest.raises(ConfigError, match="data.mixup.prob' = 1.5 is out of range"):
        load_config(None, ["data.mixup.mixup_alpha=0.8", "data.mixup.prob=1.5"])


# ------------------------------------------------------------------------------------------------ attack labels

def test_pgd_with_soft_labels_ascends_the_soft_target_cross_entropy() -> None:
    """One PGD step from the clean image equals the step computed by hand on CE(f(x), soft)."""
    model = tiny_model().eval()
    torch.manual_seed(2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, K, (8,))
    soft = 0.6 * smoothed(y, 0.1) + 0.4 * smoothed(y.flip(0), 0.1)
    eps, step = 8 / 255, 2 / 255
    got = PGD(eps, step, 1, clean_start_prob=1.0, seed=0)(model, x, soft)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), soft, reduction="sum"), xg)
    by_hand = torch.min(torch.max(x + step * g.sign(), (x - eps).clamp(min=0)), (x + eps).clamp(max=1))
    assert torch.equal(got, by_hand)
    (gh,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    assert not torch.equal(g.sign(), gh.sign())  # the soft labels change the attack's direction
    with pytest.raises(ValueError, match="targeted needs class indices"):
        PGD(eps, step, 1, targeted=True)(model, x, soft)
    with pytest.raises(ValueError, match="keep_best needs class indices"):
        PGD(eps, step, 1, keep_best=True)(model, x, soft)


class RecordingPGD(PGD):
    """The training attack, recording the labels and images it was given."""

    seen: list

    def perturb(self, model, x, y, target=None):
        self.seen.append((x.clone(), y.clone()))
        return super().perturb(model, x, y, target)


class RecordingMadry(Madry):
    """The Madry objective, recording the labels its loss was given and its output."""

    seen: list

    def __call__(self, model, x, x_adv, y):
        out = super().__call__(model, x, x_adv, y)
        self.seen.append((y.clone(), out.logits.detach().float(), out.loss.detach()))
        return out


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_training_step_gives_the_attack_and_loss_the_documented_labels(labels: str, digits_root: Path,
                                                                        tmp_path: Path) -> None:
    s = 0.1
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, labels, **{
        "data.mixup.mixup_alpha": 0.8, "data.mixup.cutmix_alpha": 1.0, "data.mixup.mode": "elem",
        "data.randaugment_ops": 2, "attack.mixup_labels": labels, "objective.label_smoothing": s}))
    run = build(cfg, torch.device("cpu"))
    atk = run.attack
    run.attack = RecordingPGD(atk.eps, atk.step, atk.iters, clean_start_prob=atk.clean_start_prob, seed=atk.seed)
    run.objective = RecordingMadry(s)
    run.attack.seen, run.objective.seen, metrics = [], [], []
    train_epoch(run, lambda m, plan, end: metrics.append(m) or "max_steps")

    loader = run.train_loader()
    loader.set_epoch(0)
    x, y = next(iter(loader))  # the same seeded crops again
    replay = Mixing(cfg.data.mixup, K, s, labels, cfg.run.seed)
    ref = replay(RandAugmentBatch(2, 9, cfg.run.seed)(x), y)
    (x_att, y_att), = run.attack.seen
    (y_loss, logits, loss), = run.objective.seen
    assert torch.equal(x_att, ref.x) and not torch.equal(ref.hard, y)  # mixed images, some dominant labels swapped
    assert torch.equal(y_att, ref.soft if labels == "soft" else ref.soft.argmax(1))
    assert torch.equal(y_loss, ref.soft)
    torch.testing.assert_close(loss, F.cross_entropy(logits, ref.soft))  # smoothing inside the targets only
    assert not torch.allclose(loss, F.cross_entropy(logits, ref.soft, label_smoothing=s))
    assert metrics[0]["acc"] == pytest.approx((logits.argmax(1) == ref.hard).float().mean().item())


# ------------------------------------------------------------------------------------------------ objectives

@pytest.mark.parametrize("name", MIXUP_OBJECTIVES)
def test_cross_entropy_objectives_take_soft_targets(name: str) -> None:
    """One-hot soft targets give the hard-label loss (a smoothed one-hot gives the smoothed loss, so smoothing is
    applied once), and the loss is linear in the targets: lam L(y_a) + (1 - lam) L(y_b) for a mixed target."""
    split = name in ("mbn", "advprop")
    model = tiny_model(bn_domains=("clean", "adv"), eval_domain="clean") if split else tiny_model()
    model.train()
    torch.manual_seed(3)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, K, (8,))
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    s, lam = 0.1, 0.3

    def loss(obj, target):
        return obj(model, x, x_adv, target).loss

    plain = build_objective(ObjectiveCfg(name=name, label_smoothing=0.0, clean_ratio=0.5))
    smooth = build_objective(ObjectiveCfg(name=name, label_smoothing=s, clean_ratio=0.5))
    torch.testing.assert_close(loss(plain, F.one_hot(y, K).float()), loss(plain, y))
    torch.testing.assert_close(loss(smooth, smoothed(y, s)), loss(smooth, y))
    assert not torch.allclose(loss(smooth, y), loss(plain, y))
    mixed = loss(smooth, lam * smoothed(y, s) + (1 - lam) * smoothed(y.flip(0), s))
    torch.testing.assert_close(mixed, lam * loss(smooth, y) + (1 - lam) * loss(smooth, y.flip(0)))


# ------------------------------------------------------------------------------------------------ training runs

def test_mixup_cutmix_randaugment_run_is_finite_and_resumes_exactly(digits_root: Path, tmp_path: Path) -> None:
    """A run stopped after one step and resumed to three equals an unbroken three-step run bit for bit: the mixing
    and RandAugment draws are carried by the checkpoint (their call counters)."""
    common = {"data.mixup.mixup_alpha": 0.8, "data.mixup.cutmix_alpha": 1.0, "data.mixup.mode": "pair",
              "data.randaugment_ops": 2, "data.randaugment_magnitude": 9, "objective.label_smoothing": 0.1,
              "data.batch_size": 32, "log.every_steps": 1}
    full = main(load_config(None, tiny_overrides(digits_root, tmp_path, "full", **common, **{"run.max_steps": 3})))
    assert full["step"] == 3
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **common, **{"run.max_steps": 1})))
    ck = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert ck["mixing"] == {"calls": 1} and ck["randaugment"] == {"calls": 1}
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **common,
                                          **{"run.max_steps": 3, "run.resume": "auto"})))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 3 and b["mixing"] == {"calls": 3}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
