"""DAG (issue 15; Xie thesis Sec 2.3, Algorithm 1): the permutation has no fixed point, one step equals a direct
computation, background targets never count, and an image stops once no target is still correct."""
from __future__ import annotations

import torch
from torch import nn

from atscale.attacks.dag import DAG, GAMMA, derangement, segmentation_logits


def test_derangement_moves_every_foreground_class_and_keeps_the_background() -> None:
    maps = derangement(6, 50, torch.Generator().manual_seed(0))
    assert torch.all(maps[:, 0] == 0)
    fg = maps[:, 1:]
    assert torch.all(fg != torch.arange(1, 6)) and torch.all(fg.sort(1).values == torch.arange(1, 6))


def _seg_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 1)  # 4 classes, per-pixel logits


def test_one_step_is_the_normalized_sum_of_active_gradient_differences() -> None:
    model, x = _seg_model(), torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    fn = segmentation_logits(model)
    with torch.no_grad():
        labels = fn(x).argmax(-1)  # every target starts correct
    labels[0, :3] = 0  # a few background targets
    adv = (labels % 3) + 1
    res = DAG(max_iters=1).perturb(fn, x, labels, adv_labels=adv)
    xr = x.clone().requires_grad_(True)
    logits = fn(xr)
    active = (labels != 0) & (logits.argmax(-1) == labels)
    gap = logits.gather(-1, adv[..., None]).squeeze(-1) - logits.gather(-1, labels[..., None]).squeeze(-1)
    (r,) = torch.autograd.grad((gap * active).sum(), xr)
    expected = (x + GAMMA * r / r.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(res.x_adv, expected, atol=1e-7)
    assert res.r.flatten(1).abs().amax(1).allclose(torch.full((2,), GAMMA), atol=1e-7)
    assert res.active[0] == active.sum(1).tolist()


def test_background_targets_never_count_and_a_converged_image_stops() -> None:
    model = _seg_model()
    with torch.no_grad():  # no bias and mid-grey pixels: every class is reachable inside the [0, 1] cube
        model.bias.zero_()
    x = 0.4 + 0.2 * torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    fn = segmentation_logits(model)
    with torch.no_grad():
        pred = fn(x).argmax(-1)
    labels = pred.clone()
    labels[0] = 0  # image 0: all background, nothing to attack
    labels[1][pred[1] == 0] = 1  # image 1: no background target
    res = DAG(gamma=8 / 255, max_iters=50, seed=3).perturb(fn, x, labels)
    assert torch.equal(res.x_adv[0], x[0]) and res.iters[0] == 0 and res.active[0][0] == 0
    assert torch.all(res.adv_labels[1] != labels[1])
    still = (fn(res.x_adv).argmax(-1)[1] == labels[1]).sum().item()
    assert res.iters[1] < 50 and still == 0  # converged: no target of image 1 is still correct
