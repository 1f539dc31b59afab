"""DAG (issue 15; Xie thesis Sec 2.3, Algorithm 1): the permutation has no fixed point, one step equals a direct
computation, background targets never count, and an image stops once no target is still correct."""
from __future__ import annotations

import torch
from torch import nn

from atscale.attacks.dag import DAG, GAMMA, TargetLogits, derangement, image_permutations, perceptibility, permuted, segmentation_logits


def test_derangement_moves_every_class() -> None:
    maps = derangement(6, 50, torch.Generator().manual_seed(0))  # Sec 2.3.1: over all C classes, pi(c) != c
    assert torch.all(maps != torch.arange(6)) and torch.all(maps.sort(1).values == torch.arange(6))
    assert bool((maps[:, 1:] == 0).any())  # a foreground class may be sent to the background
    kept = derangement(6, 50, torch.Generator().manual_seed(0), background=0)
    assert torch.all(kept[:, 0] == 0) and torch.all(kept[:, 1:] != torch.arange(1, 6))


def test_each_image_draws_its_own_pi_whatever_the_batch() -> None:
    whole = image_permutations(8, list(range(6)), seed=5)
    assert torch.equal(torch.cat([image_permutations(8, [0, 1, 2, 3], 5), image_permutations(8, [4, 5], 5)]), whole)
    assert torch.equal(image_permutations(8, [5, 2], 5), whole[[5, 2]])
    assert len({tuple(m.tolist()) for m in whole}) == 6 and not torch.equal(image_permutations(8, [0, 1], 6), whole[:2])


def _seg_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 1)  # 4 classes, per-pixel logits


def _reachable(n: int, size: int, seed: int) -> tuple[TargetLogits, torch.Tensor, torch.Tensor]:
    """The bias-free model on mid-grey pixels (every class is reachable inside the [0, 1] cube): its target logits,
    ``n`` images of ``size`` x ``size`` and its predictions on them."""
    model = _seg_model()
    with torch.no_grad():
        model.bias.zero_()
    x = 0.4 + 0.2 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    fn = segmentation_logits(model)
    with torch.no_grad():
        return fn, x, fn(x).argmax(-1)


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
    fn, x, pred = _reachable(2, 4, 2)
    labels = pred.clone()
    labels[0] = 0  # image 0: all background, nothing to attack
    labels[1][pred[1] == 0] = 1  # image 1: no background target
    res = DAG(gamma=8 / 255, max_iters=50, seed=3).perturb(fn, x, labels)
    assert torch.equal(res.x_adv[0], x[0]) and res.iters[0] == 0 and res.active[0][0] == 0
    assert torch.all(res.adv_labels[1] != labels[1])
    still = (fn(res.x_adv).argmax(-1)[1] == labels[1]).sum().item()
    assert res.iters[1] < 50 and still == 0  # converged: no target of image 1 is still correct
    assert res.converged.tolist() == [True, True] and len(res.active) == int(res.iters.max()) + 1


def test_a_converged_image_leaves_the_batch_and_batching_changes_nothing() -> None:
    base, x, labels = _reachable(3, 4, 5)
    labels[0] = 0  # image 0 has no target: converged at m = 0
    seen: list[list[int]] = []

    def fn(xr: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(rows.tolist() if rows is not None else [])
        return base(xr, rows)

    attack = DAG(gamma=8 / 255, max_iters=60, seed=1)
    res = attack.perturb(fn, x, labels)
    assert res.converged.all() and 0 == res.iters[0] < res.iters[1] < res.iters[2]  # they leave one at a time
    assert seen[0] == [0] and all(0 not in s for s in seen[1:])  # [0]: the class count; image 0 never enters
    assert [len(s) for s in seen[1:]] == [2] * int(res.iters[1] + 1) + [1] * int(res.iters[2] - res.iters[1])
    for i in range(3):  # each image alone: the same steps, the same result
        one = attack.perturb(base, x[i:i + 1], labels[i:i + 1], indices=[i])
        assert torch.allclose(one.x_adv[0], res.x_adv[i], atol=1e-6) and one.iters[0] == res.iters[i]


def test_a_batch_without_targets_or_images_takes_no_step() -> None:
    model, calls = _seg_model(), []
    base = segmentation_logits(model)

    def fn(xr: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(len(xr))
        return base(xr, rows)

    x = torch.rand(2, 3, 4, 4)
    res = DAG(max_iters=5).perturb(fn, x, torch.zeros(2, 16, dtype=torch.long))
    assert calls == [1] and torch.equal(res.x_adv, x) and res.iters.tolist() == [0, 0] and res.active == [[0, 0]]
    empty = DAG().perturb(fn, x[:0], torch.zeros(0, 16, dtype=torch.long))
    assert empty.x_adv.shape == (0, 3, 4, 4) and empty.iters.numel() == 0 and calls == [1]


def test_perceptibility_is_the_root_mean_squared_pixel_norm() -> None:
    r = torch.zeros(2, 3, 2, 2)
    r[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])  # one pixel of norm 0.5 among 4
    assert perceptibility(r).tolist() == [0.25, 0.0]  # sqrt(0.25 / 4)


def test_perm_permutes_rows_and_columns_and_keeps_the_values() -> None:
    r = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    p = permuted(r, torch.Generator().manual_seed(0))
    assert not torch.equal(p, r) and torch.allclose(perceptibility(p), perceptibility(r))
    for i in range(2):  # each row of p is a row of r with its columns permuted the same way in every channel
        rows = [int(((r[i, 0] - p[i, 0, k].sort().values[None]).abs().sum(1) == 0).nonzero()[0]) for k in range(4)]
        assert sorted(rows) == [0, 1, 2, 3]
        cols = [int((r[i, 0, rows[0]] == v).nonzero()[0]) for v in p[i, 0, 0]]
        assert torch.equal(p[i], r[i][:, rows][:, :, cols])


def test_a_fooling_label_map_is_reached() -> None:
    """Sec 2.3.4: with an arbitrary adversarial label map (here a square of class 3 on class-1 targets), DAG drives
    every target to its given label."""
    fn, x, labels = _reachable(1, 6, 4)
    want = torch.full_like(labels, 1).view(1, 6, 6)
    want[0, 1:4, 1:4] = 3
    want = want.view(1, -1)
    want[labels == want] = 2  # a target's adversarial label differs from its own
    res = DAG(gamma=8 / 255, max_iters=200).perturb(fn, x, labels, valid=torch.ones_like(labels, dtype=torch.bool),
                                                    adv_labels=want)
    assert res.iters[0] < 200 and not bool((fn(res.x_adv).argmax(-1) == labels).any())
