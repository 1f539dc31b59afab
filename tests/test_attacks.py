"""PGD / FGSM invariants: budget and range, targeted success, BN statistics and parameter grads untouched, start
choice, target distribution, and PGD accuracy not increasing with more steps."""
from __future__ import annotations

import pytest
import torch

from atscale.attacks import PGD, attack_mode, build_attack, fgsm_rs
from atscale.config import AttackCfg
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.suites import run_suite_of
from atscale.models import create_model


def _random_model(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]})


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_perturbation_within_eps_and_pixel_range(attack: str, targeted: bool) -> None:
    model = _random_model()
    x = torch.rand(16, 3, 32, 32)
    x[:4] = 0.0  # corners of the pixel range make projection and clipping both matter
    x[4:8] = 1.0
    eps = 8 / 255
    atk = PGD(eps, 3 / 255, 7, targeted=targeted, clean_start_prob=0.3) if attack == "pgd" else fgsm_rs(eps)
    x_adv = atk(model, x, torch.randint(0, 10, (16,)))
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - x).abs().max().item() > eps / 2  # it actually moved


def test_attack_leaves_bn_statistics_params_and_modes_untouched() -> None:
    model = _random_model().train()
    before = _bn_state(model)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    PGD(16 / 255, 2 / 255, 5, targeted=True)(model, x, y)
    after = _bn_state(model)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(weights[k], p) for k, p in model.named_parameters())
    assert all(m.training for m in model.modules())
    # the same forward in train mode would have moved the statistics: the check above is not vacuous
    model(x)
    assert not all(torch.equal(before[k], v) for k, v in _bn_state(model).items())


def test_attack_mode_computes_no_parameter_gradients() -> None:
    model = _random_model()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    with attack_mode(model):
        assert not model.training
        loss = model(x).sum()
        assert loss.grad_fn is not None
        (g,) = torch.autograd.grad(loss, x)
    assert g.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_targets_are_uniform_over_wrong_classes() -> None:
    model = _random_model(num_classes=5)
    y = torch.zeros(4000, dtype=torch.long)
    res = PGD(1 / 255, 1 / 255, 1, targeted=True, seed=3).perturb(model, torch.rand(4000, 3, 8, 8), y)
    counts = torch.bincount(res.target, minlength=5)
    assert counts[0] == 0
    assert counts[1:].min() > 4000 / 4 * 0.85 and counts[1:].max() < 4000 / 4 * 1.15


def test_clean_or_random_start_per_example_and_per_batch() -> None:
    x = torch.rand(2000, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    start = PGD(8 / 255, 1 / 255, 1, clean_start_prob=0.2)._start(x, g)
    clean = (start == x).flatten(1).all(1)
    assert 0.15 < clean.float().mean().item() < 0.25
    assert PGD(8 / 255, 1 / 255, 1, clean_start_prob=1.0)._start(x, g).equal(x)
    batches = [PGD(8 / 255, 1 / 255, 1, clean_start_prob=0.5, start_mode="per_batch")._start(x, g) for _ in range(40)]
    per_batch = [(s == x).flatten(1).all(1) for s in batches]
    assert all(c.all() or not c.any() for c in per_batch)
    assert 5 < sum(bool(c.all()) for c in per_batch) < 35


def test_attack_is_reproducible_from_its_seed_and_state() -> None:
    model = _random_model()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    a, b = PGD(8 / 255, 2 / 255, 2, seed=5), PGD(8 / 255, 2 / 255, 2, seed=5)
    a(model, x, y)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(model, x, y), b(model, x, y))


def test_config_budgets_convert_from_pixel_units_once() -> None:
    atk = build_attack(AttackCfg(eps=16, step=1, iters=30, targeted=True, clean_start_prob=0.2))
    assert isinstance(atk, PGD)
    assert atk.eps == pytest.approx(16 / 255) and atk.step == pytest.approx(1 / 255) and atk.iters == 30
    fg = build_attack(AttackCfg(name="fgsm", eps=8, step=10))
    assert fg.iters == 1 and fg.clean_start_prob == 0.0 and fg.step == pytest.approx(10 / 255)


def test_targeted_attack_hits_target_far_more_often_than_chance(trained_digits_model, digits_val_batch) -> None:
    model, _ = trained_digits_model
    x, y = digits_val_batch
    pred = model(x).argmax(1)
    res = PGD(32 / 255, 4 / 255, 20, targeted=True, seed=1).perturb(model, x, y)
    hit = (model(res.x_adv).argmax(1) == res.target).float().mean().item()
    chance = (pred == res.target).float().mean().item()  # clean predictions that happen to equal the target
    assert chance < 0.05
    assert hit > 0.5 and hit > 10 * max(chance, 0.01)


def test_untargeted_attack_reduces_accuracy(trained_digits_model, digits_val_batch) -> None:
    model, _ = trained_digits_model
    x, y = digits_val_batch
    clean = (model(x).argmax(1) == y).float().mean().item()
    adv = (model(PGD(32 / 255, 4 / 255, 10)(model, x, y)).argmax(1) == y).float().mean().item()
    assert clean > 0.85
    assert adv < clean - 0.5


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_accuracy_does_not_increase_with_more_steps(trained_digits_model, digits_root, targeted: bool) -> None:
    from atscale.data import make_loader

    model, cfg = trained_digits_model
    # k >= eps / step: every PGD-k steps by the same 2/255 (the step rule max(step, eps/k)), so PGD-j's iterates are a
    # prefix of PGD-k's and the first-hit rule makes accuracy non-increasing in k
    ev = cfg.eval.__class__(steps=[8, 10, 20, 40], eps=16, step=2, targeted=targeted)
    loader = make_loader(digits_root, "val", cfg.data, torch.device("cpu"), 0, train=False)
    res = run_suite(model, loader, run_suite_of(ev), progress=False, probes=False)["results"]
    assert all(res[f"pgd{k}"]["step"] == 2 for k in ev.steps)
    accs = [res[f"pgd{k}"]["acc"] for k in ev.steps]
    rates = [res[f"pgd{k}"]["success_rate"] for k in ev.steps]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert all(a <= b for a, b in zip(rates, rates[1:])), rates
    assert accs[-1] < accs[0] and accs[-1] < res["clean"]["acc"] - 0.2
    assert rates[-1] > rates[0]
