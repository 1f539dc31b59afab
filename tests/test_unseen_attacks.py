"""The ARN paper's unseen attack types (issue 14): DDN, CW-L2, STA, FWA, each checked against a direct computation
and on a trained digits model, and the ``unseen`` suite that runs them in their own threat models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from atscale.attacks import CWL2, DDN, FWA, STA, lp_norm, make_attack
from atscale.attacks.spatial import flow_loss, warp
from atscale.attacks.wasserstein import transport
from atscale.errors import ConfigError
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.suites import SUITES, AttackSpec, Suite, suite_from_dict
from atscale.reporting.report import suite_table
from conftest import clearly_greater


def _linear(distance: float, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A two-class linear model on 1x4x4 images and a mid-grey image classified 0 whose L2 distance to the decision
    boundary is ``distance`` (the box does not bind: every coordinate moves by less than 0.5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = w
        lin.bias.zero_()
        lin.bias[1] = -0.5 * w.sum() - distance * w.norm()
    return nn.Sequential(nn.Flatten(), lin).eval(), torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("cls", [DDN, CWL2])
def test_minimal_norm_attacks_find_the_linear_boundary_and_answer_inside_their_ball(cls) -> None:
    model, x, y = _linear(0.3)
    res = cls(1.0, 200).perturb(model, x, y)
    assert res.success.item() and model(res.x_adv).argmax(1).item() == 1
    assert 0.3 - 1e-4 <= res.norm.item() <= 0.3 * 1.06, res.norm  # the analytic minimum |w.x + b| / ||w||
    assert lp_norm(res.x_adv - x, "l2").item() == pytest.approx(res.norm.item(), rel=1e-4)
    small = cls(0.25, 200).perturb(model, x, y)  # the boundary is out of reach: robust inside the ball
    assert not small.success.item() and model(small.x_adv).argmax(1).item() == 0
    assert lp_norm(small.x_adv - x, "l2").item() <= 0.25 + 1e-6


def test_targeted_ddn_reaches_its_target(trained_digits_model, digits_val_batch) -> None:
    model, _ = trained_digits_model
    x, y = digits_val_batch[0][:32], digits_val_batch[1][:32]
    res = DDN(4.0, 100, targeted=True, seed=1).perturb(model, x, y)
    hit = (model(res.x_adv).argmax(1) == res.target).float().mean().item()
    assert torch.all(res.target != y) and hit > 0.8
    assert torch.all(lp_norm(res.x_adv - x, "l2") <= 4.0 + 1e-5)


def test_warp_is_exact_for_zero_and_whole_pixel_flows() -> None:
    x = torch.rand(2, 3, 5, 6)
    flow = torch.zeros(2, 2, 5, 6)
    assert torch.allclose(warp(x, flow), x, atol=1e-6)
    flow[:, 0] = 1.0  # du = +1: each pixel samples its right neighbour
    assert torch.allclose(warp(x, flow)[..., :-1], x[..., 1:], atol=1e-5)
    assert torch.allclose(warp(x, flow)[..., -1], x[..., -1], atol=1e-5)  # the border replicates


def test_flow_loss_equals_a_direct_sum_over_4_neighbours() -> None:
    f = torch.randn(1, 2, 3, 4)
    h, w = 3, 4
    direct = 0.0
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                q = (min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1))
                direct += math.sqrt(float(((f[0, :, i, j] - f[0, :, q[0], q[1]]) ** 2).sum()) + 1e-8)
    assert flow_loss(f).item() == pytest.approx(direct, rel=1e-5)


def test_sta_fools_within_its_flow_budget_and_a_tiny_budget_fools_less(trained_digits_model, digits_val_batch):
    model, _ = trained_digits_model
    x, y = digits_val_batch[0][:64], digits_val_batch[1][:64]
    clean = (model(x).argmax(1) == y).float().mean().item()
    res = STA(1.0, 60).perturb(model, x, y)
    assert res.flow.abs().max().item() <= 1.0 + 1e-6
    assert torch.allclose(res.x_adv, warp(x, res.flow), atol=1e-5)
    acc = (model(res.x_adv).argmax(1) == y).float().mean().item()
    tiny = STA(0.02, 60).perturb(model, x, y)
    acc_tiny = (model(tiny.x_adv).argmax(1) == y).float().mean().item()
    assert clearly_greater(clean, acc, 64) and clearly_greater(acc_tiny, acc, 64), (clean, acc_tiny, acc)


def test_fwa_oracle_spends_exactly_its_budget_on_the_best_neighbour() -> None:
    atk = FWA(0.5, 1, kernel_size=3, entropy=1e-3)
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    grad = torch.zeros(1, 1, 9, 5, 5)
    grad[0, 0, 5, 2, 2] = 1.0  # offset index 5 of the 3x3 window = (0, +1): the right neighbour gains
    cost = torch.tensor([2 ** 0.5, 1, 2 ** 0.5, 1, 0, 1, 2 ** 0.5, 1, 2 ** 0.5])
    valid = torch.ones(1, 1, 9, 5, 5, dtype=torch.bool)
    s = atk.lmo(grad, x, cost, valid)
    assert FWA.plan_cost(s, 3).item() == pytest.approx(0.5, abs=1e-3)
    moved = transport(s, 3, (5, 5))
    assert moved[0, 0, 2, 3].item() == pytest.approx(0.5, abs=1e-3) and moved.sum().item() == pytest.approx(1.0)


def test_fwa_keeps_its_budget_and_fools_more_with_more_budget(trained_digits_model, digits_val_batch) -> None:
    model, _ = trained_digits_model
    x, y = digits_val_batch[0][:64], digits_val_batch[1][:64]  # about 900 units of mass per image
    accs = []
    for eps in (0.5, 100.0):
        res = FWA(eps, 8).perturb(model, x, y)
        assert torch.all(res.cost <= eps * (1 + 1e-4)), res.cost.max()
        assert torch.all(res.x_adv.sum((1, 2, 3)) <= x.sum((1, 2, 3)) + 1e-3)  # transport keeps mass; clipping drops
        accs.append((model(res.x_adv).argmax(1) == y).float().mean().item())
    assert clearly_greater(accs[0], accs[1], 64), accs


def test_rows_take_their_attack_threat_model_and_refuse_a_wrong_one() -> None:
    assert AttackSpec("s", "sta", eps=1.0, steps=5).norm == "flow"
    assert AttackSpec("f", "fwa", eps=0.1, steps=5).norm == "wasserstein"
    assert AttackSpec("d", "ddn", eps=127.5, steps=5).norm == "l2"
    with pytest.raises(ConfigError, match="norm 'flow' does not fit attack 'ddn'"):
        AttackSpec("d", "ddn", eps=1.0, steps=5, norm="flow")
    with pytest.raises(ConfigError, match="norm 'wasserstein' does not fit attack 'pgd'"):
        AttackSpec("p", "pgd", eps=8, steps=5, norm="wasserstein")
    with pytest.raises(ConfigError, match="mixes threat models"):
        Suite("x", [AttackSpec("p", "pgd", eps=8, steps=5), AttackSpec("s", "sta", eps=1.0, steps=5)],
              aggregates={"worst": ["p", "s"]})
    with pytest.raises(ValueError, match="attacks in the 'l2' threat model"):
        make_attack("cw-l2", eps=0.5, steps=5, norm="linf")


def test_unseen_suite_runs_every_threat_model_through_the_one_evaluator(trained_digits_model,
                                                                        digits_val_batch) -> None:
    model, _ = trained_digits_model
    named = SUITES["unseen"](8.0, 2.0, False)
    assert {s.norm for s in named.attacks} == {"linf", "l2", "flow", "wasserstein"}
    # few steps; the L2 rows at 2.0 (x 255) so that 5 steps fool a 32 px model
    rows = [dict(label=s.label, attack=s.attack, eps=510.0 if s.norm == "l2" else s.eps, steps=min(s.steps, 5),
                 step=s.step, norm=s.norm, targeted=s.targeted) for s in named.attacks]
    suite = suite_from_dict({"name": "unseen-small", "attacks": rows, "aggregates": named.aggregates})
    x, y = digits_val_batch[0][:16], digits_val_batch[1][:16]
    doc = run_suite(model, [(x, y)], suite, progress=False, probes=False)
    res = doc["results"]
    for label in ("ddn", "cw-l2", "sta", "fwa", "worst-l2", "worst-flow"):
        assert res[label]["acc"] <= res["clean"]["acc"]
    assert res["worst-l2"]["acc"] <= min(res[k]["acc"] for k in ("ddn", "cw-l2", "pgd40-l2"))
    assert res["ddn"]["acc"] < res["clean"]["acc"]
    table = suite_table(res)
    assert "1 px" in table and "0.1 W1" in table and "510/255" in table
