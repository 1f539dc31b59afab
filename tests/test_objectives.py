"""Training strategies (issue 5): each objective's loss against a direct computation on a fixed batch, a short training
run that lowers it, and the training controls (BN consistency, budget warmup, EMA, early stopping, progressive resizing,
free replays) through real runs on digits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks import PGD
from atscale.checkpoint import load_checkpoint
from atscale.config import ConfigError, load_config
from atscale.training.controls import EarlyStopping, phase_at
from atscale.training.schedule import plan_at
from atscale.models import create_model
from atscale.training.objectives import CleanRatio, Free, LogitPairing, Mart, Trades, build_objective
from atscale.training.optim import lr_factor
from atscale.train import main
from conftest import tiny_overrides

D = torch.float32


class _Lin(nn.Module):
    """A linear softmax classifier on 3x4x4 inputs: BN-free, so losses over concatenated batches are exact."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.fc = nn.Linear(48, 5).to(D)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(5, 48, generator=g, dtype=D))
            self.fc.bias.copy_(torch.randn(5, generator=g, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 4, 4, generator=g, dtype=D)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=g, dtype=D)).clamp(0, 1)
    y = torch.randint(0, 5, (8,), generator=g)
    return _Lin(), x, x_adv, y


def _ce(z, y):
    return -z.log_softmax(1).gather(1, y[:, None]).squeeze(1)


def _kl(p_logits, q_logits):
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    return (p * (p.log() - q.log())).sum(1)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_clean_ratio_loss(batch, ratio):
    model, x, xa, y = batch
    out = CleanRatio(ratio)(model, x, xa, y)
    k = int(round(ratio * 8))
    terms = torch.cat([_ce(model(x[:k]), y[:k]), _ce(model(xa), y)])
    torch.testing.assert_close(out.loss, terms.mean())
    assert (out.clean_logits is None) == (k < 8)


def test_alp_loss(batch):
    model, x, xa, y = batch
    out = LogitPairing(0.5, 0.5)(model, x, xa, y)
    zc, za = model(x), model(xa)
    expect = 0.5 * _ce(zc, y).mean() + 0.5 * _ce(za, y).mean() + 0.5 * ((zc - za) ** 2).mean()
    torch.testing.assert_close(out.loss, expect)


def test_trades_loss_and_attack(batch):
    model, x, _, y = batch
    obj = Trades(6.0)
    pgd = PGD(8 / 255, 2 / 255, 5, seed=0)
    xa = obj.make_adv(model, pgd, x, y)
    assert (xa - x).abs().max() <= 8 / 255 + 1e-12 and xa.min() >= 0 and xa.max() <= 1
    kl_found = _kl(model(x), model(xa)).sum()
    start = (x + 0.001 * torch.randn(x.shape, dtype=D)).clamp(0, 1)
    assert kl_found > 10 * _kl(model(x), model(start)).sum()  # the inner step maximises the KL term
    out = obj(model, x, xa, y)
    torch.testing.assert_close(out.loss, _ce(model(x), y).mean() + 6.0 * _kl(model(x), model(xa)).mean())


def test_mart_loss(batch):
    model, x, xa, y = batch
    out = Mart(6.0)(model, x, xa, y)
    za, zc = model(xa), model(x)
    pa = za.softmax(1)
    wrong = torch.stack([max(pa[i, k] for k in range(5) if k != y[i]) for i in range(8)])
    bce = _ce(za, y) - torch.log(1 - wrong)
    expect = bce.mean() + 6.0 * (_kl(zc, za) * (1 - zc.softmax(1)[torch.arange(8), y])).mean()
    torch.testing.assert_close(out.loss, expect)


def test_free_replays_carry_the_perturbation(batch):
    model, x, _, y = batch
    obj = Free(replays=3)
    pgd = PGD(8 / 255, 8 / 255, 1)
    delta = torch.zeros_like(x)
    for _ in range(3):
        xa = obj.make_adv(model, pgd, x, y)
        torch.testing.assert_close(xa.detach(), (x + delta).clamp(0, 1))
        out = obj(model, x, xa, y)
        out.loss.backward()
        g = xa.grad.clone()
        obj.after_backward()
        delta = ((x + (delta + 8 / 255 * g.sign()).clamp(-8 / 255, 8 / 255)).clamp(0, 1) - x)
        torch.testing.assert_close(obj.delta, delta)
        torch.testing.assert_close(out.loss, _ce(model(xa.detach()), y).mean())
    assert model.fc.weight.grad is not None  # the same backward produced the weight gradient
    assert (obj.delta.abs() > 0).any() and obj.delta.abs().max() <= 8 / 255 + 1e-12


@pytest.mark.parametrize("name", ["ratio", "alp", "trades", "mart", "free", "mixed", "madry"])
def test_short_training_lowers_the_objective(name):
    """A tiny ResNet on a fixed batch of digits-like blobs: 25 SGD steps on the objective lower it well below its start."""
    torch.manual_seed(0)
    model = create_model("resnet18", 4, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]}, channels_last=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 4
    x = 0.2 + 0.1 * torch.rand(32, 3, 16, 16, generator=g)
    for i, c in enumerate(y.tolist()):  # class c: a bright quadrant c
        x[i, :, 8 * (c // 2): 8 * (c // 2) + 8, 8 * (c % 2): 8 * (c % 2) + 8] += 0.6
    cfg = load_config(None, [f"objective.name={name}", "objective.label_smoothing=0", "objective.clean_ratio=0.5",
                             "objective.free_replays=2"]).objective
    obj = build_objective(cfg)
    pgd = PGD(4 / 255, 2 / 255, 2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        for _ in range(obj.replays):
            model.train()
            xa = obj.make_adv(model, pgd, x, y)
            loss = obj(model, x, xa, y).loss
            opt.zero_grad()
            loss.backward()
            obj.after_backward()
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses


def test_controls_units():
    cfg = load_config(None, ["attack.warmup_epochs=2", "schedule.warmup_epochs=0", "schedule.name=constant"])
    half = plan_at(cfg, 0, 50, 100, 0.1, 8 / 255, 2 / 255)  # epoch 0.5 of a 2-epoch budget warmup
    assert half.epoch == 0.5 and half.lr == pytest.approx(0.1)
    assert half.eps == pytest.approx(2 / 255) and half.step == pytest.approx(0.5 / 255)
    full = plan_at(cfg, 3, 0, 100, 0.1, 8 / 255, 2 / 255)
    assert full.eps == pytest.approx(8 / 255) and full.step == pytest.approx(2 / 255)
    pgd = PGD(8 / 255, 2 / 255, 3)
    pgd.set_budget(half.eps, half.step)
    assert pgd.eps == half.eps and pgd.step == half.step
    st = EarlyStopping(patience=2)
    assert st.update(0.3, 1) == (True, False) and st.update(0.3, 2) == (False, False)
    assert st.update(0.5, 3) == (True, False) and st.update(0.4, 4) == (False, False)
    assert st.update(0.45, 5) == (False, True) and st.best == 0.5 and st.best_step == 3
    phases = [{"until_epoch": 2, "image_size": 128, "batch_size": 256}, {"until_epoch": 5, "image_size": 224}]
    assert phase_at(0, phases, 224, 64)[:3] == (0, 128, 256) and phase_at(3, phases, 224, 64)[:3] == (1, 224, 64)
    sched = load_config(None, ["schedule.name=linear", "schedule.warmup_epochs=2", "schedule.epochs=10"]).schedule
    assert lr_factor(199, 100, sched) == pytest.approx(1.0) and lr_factor(600, 100, sched) == pytest.approx(0.5)
    assert lr_factor(1000, 100, sched) == 0.0


@pytest.mark.parametrize("over, pattern", [
    ({"objective.name": "trades", "attack.name": "none"}, "needs an attack"),
    ({"objective.name": "free", "dist.grad_accum": 2}, "dist.grad_accum = 1"),
    ({"eval.early_stop_patience": 2, "eval.every_epochs": 0}, "need eval.every_epochs >= 1"),
    ({"data.phases": [{"until_epoch": 3, "image_size": 128}], "schedule.epochs": 5}, "must reach schedule.epochs"),
    ({"data.phases": [{"until": 3}]}, r"data.phases\[0\] .* is invalid"),
    ({"objective.name": "advprop", "model.kwargs": {"norm_layer": "groupnorm"}}, "model.bn_domains"),
])
def test_invalid_strategy_combinations_fail_clearly(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_bn_consistency_warmup_ema_and_free_replays_in_a_real_run(digits_root: Path, tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "ctl", **{
        "schedule.epochs": 2, "schedule.bn_eval_last_epochs": 1, "attack.warmup_epochs": 1.0, "optim.ema_decay": 0.9,
        "objective.name": "free", "objective.free_replays": 2, "attack.step": 32, "log.every_steps": 1, "optim.lr": 0.1,
        "run.keep_last": 3, "run.export": True})
    res = main(load_config(None, over))
    run = tmp_path / "ctl"
    train = _rows(run, "train")
    batches = 1438 // 64
    assert res["step"] == 2 * 2 * batches  # two optimizer steps per minibatch
    eps = [r["eps"] for r in train]
    assert eps[0] < 2 and eps[batches * 2 - 1] > 30 and all(e == pytest.approx(32) for e in eps[batches * 2 + 1:])
    assert all(a <= b + 1e-9 for a, b in zip(eps, eps[1:]))
    ep = _rows(run, "epoch")
    assert [r["bn_eval"] for r in ep] == [False, True]
    ck = sorted((run / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    s1, s2 = load_checkpoint(ck[-2]), load_checkpoint(ck[-1])
    rm = [k for k in s1["model"] if k.endswith("running_mean")]
    assert rm and all(torch.equal(s1["model"][k], s2["model"][k]) for k in rm)  # last epoch: statistics frozen
    w = [k for k in s1["model"] if k.endswith("conv1.weight")]
    assert any(not torch.equal(s1["model"][k], s2["model"][k]) for k in w)  # ... while the weights train
    assert "model_ema" in s2 and any(not torch.equal(s2["model"][k], s2["model_ema"][k]) for k in w)
    assert s2["objective"]["delta"].abs().max() <= 32 / 255 + 1e-6
    from safetensors.torch import load_file

    exported = load_file(str(run / "export" / "model.safetensors"))
    key = next(k for k in exported if k.endswith("conv1.weight"))
    torch.testing.assert_close(exported[key], s2["model_ema"]["net." + key])  # export = EMA weights


def test_early_stopping_selects_best_and_progressive_resizing(digits_root: Path, tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "es", **{
        "schedule.epochs": 6, "schedule.name": "constant", "schedule.warmup_epochs": 0, "optim.lr": 1e-7,
        "eval.every_epochs": 1, "eval.quick_images": 200, "eval.quick_steps": 2, "eval.early_stop_patience": 2,
        "eval.select_best": True, "schedule.bn_eval_last_epochs": 6,
        "data.phases": [{"until_epoch": 1, "image_size": 24}, {"until_epoch": 6, "image_size": 32}]})
    res = main(load_config(None, over))
    run = tmp_path / "es"
    ep = _rows(run, "epoch")
    assert [r["image_size"] for r in ep][:2] == [24, 32]
    val = _rows(run, "val")
    assert len(val) == 3 and len(ep) == 3  # lr ~ 0: no check beats the first one; patience 2 stops after epoch 3
    assert res["train"]["early_stopped"] and res["train"]["selected_step"] == val[0]["step"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == val[0]["step"] and best["weights"] == "raw"


def test_checkpoint_evaluation_uses_ema_weights_when_kept(digits_root: Path, tmp_path: Path) -> None:
    from atscale.checkpoint import model_from_checkpoint

    over = tiny_overrides(digits_root, tmp_path, "ema", **{"optim.ema_decay": 0.5, "run.max_steps": 3})
    main(load_config(None, over))
    ck = tmp_path / "ema" / "checkpoints" / "last.pt"
    state = load_checkpoint(ck)
    auto, _, _ = model_from_checkpoint(ck, torch.device("cpu"))
    raw, _, _ = model_from_checkpoint(ck, torch.device("cpu"), weights="raw")
    k = next(k for k in state["model"] if k.endswith("conv1.weight"))
    assert torch.equal(auto.state_dict()[k], state["model_ema"][k]) and torch.equal(raw.state_dict()[k], state["model"][k])
    assert not torch.equal(state["model"][k], state["model_ema"][k])


def test_training_attack_takes_least_likely_targets_from_the_config() -> None:
    from atscale.attacks import build_attack

    cfg = load_config(None, ["attack.targeted=true", "attack.target_mode=least_likely", "attack.iters=1"])
    atk = build_attack(cfg.attack, seed=0)
    model = _Lin()
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(8, dtype=torch.long)
    res = atk.perturb(model, x, y)
    with torch.no_grad():
        ll = model(x).scatter(1, y[:, None], float("inf")).argmin(1)
    assert torch.equal(res.target, ll)
