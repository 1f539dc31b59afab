"""Dense Adversary Generation, DAG (Xie thesis Ch. 2, Sec 2.3, Algorithm 1): one perturbation that attacks every
recognition target of an image at once (every pixel of a segmentation map; every dense proposal of a detector).

Targets t_n carry labels l_n and adversarial labels l'_n = pi(l_n), pi a random permutation of the C classes per
image with pi(c) != c (drawn per image index, so independent of batching); background targets are left out (footnote
1). Each iteration m takes the active set T_m (targets still predicted as l_n), r_m = sum over T_m of grad (f_{l'_n} -
f_{l_n}), the step r'_m = gamma / ||r_m||_inf * r_m, and X_{m+1} = X_m + r'_m, until T_m is empty or m = M_0 (200
for segmentation, 150 for detection; X_{M_0} is checked too);
the image is clipped to the valid range (here at every step, so the network only ever sees valid images; the thesis
clips the final sum). The thesis' gamma = 0.5 is in 0..255 units on a mean-subtracted input: mean
subtraction does not scale, so on atscale's [0, 1] images it is 0.5 / 255 (``gamma`` here is a fraction).

``logits_fn(x, rows) -> (len(rows), T, C)`` gives the per-target logits of the batch images ``rows`` that ``x`` holds
(segmentation: the (N, C, H, W) map flattened to targets; detection: the box head's logits for each image's fixed
proposals), so one loop serves both tasks; each step scores only the images that still have active targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

GAMMA = 0.5 / 255


def derangement(num_classes: int, n: int, g: torch.Generator, background: int | None = None) -> torch.Tensor:
    """(n, num_classes) maps: per image a random permutation pi of the classes with pi(c) != c (Sec 2.3.1: over all C
    classes, so a foreground target may be sent to the background). ``background``, when given, maps to itself and
    the other classes are permuted among themselves."""
    pool = [c for c in range(num_classes) if c != background]
    if len(pool) < 2:
        raise ValueError(f"DAG needs at least 2 classes to permute; got {len(pool)}")
    maps = torch.arange(num_classes).repeat(n, 1)
    pool_t = torch.tensor(pool)
    for i in range(n):
        while True:  # rejection sampling: about e tries on average
            p = torch.randperm(len(pool), generator=g)
            if not bool((p == torch.arange(len(pool))).any()):
                break
        maps[i, pool_t] = pool_t[p]
    return maps


def image_permutations(num_classes: int, indices: list[int], seed: int) -> torch.Tensor:
    """pi for the images of a split at ``indices``, each drawn from its own (seed, index) stream, so an image's pi does
    not depend on the batch it is attacked in."""
    return torch.cat([derangement(num_classes, 1, torch.Generator().manual_seed(seed * 1_000_003 + i))
                      for i in indices])


class TargetLogits(Protocol):
    """Per-target logits (len(rows), T, C) of the images ``x`` = batch[rows] (``rows`` None: the whole batch)."""

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, /) -> torch.Tensor: ...


@dataclass
class DAGResult:
    x_adv: torch.Tensor
    r: torch.Tensor  # x_adv - x
    adv_labels: torch.Tensor  # (N, T) l'_n (background targets: their own label)
    iters: torch.Tensor  # (N,) steps each image took (M_0 when it did not converge)
    converged: torch.Tensor  # (N,) bool: no target of the image is still correct at the end
    active: list[list[int]] = field(default_factory=list)  # per iteration: active targets per image


class DAG:
    """DAG with ``gamma`` (a fraction of [0, 1]) and ``max_iters`` = M_0; ``seed`` draws the permutations."""

    def __init__(self, gamma: float = GAMMA, max_iters: int = 200, seed: int = 0, background: int | None = 0):
        if gamma <= 0 or max_iters < 1:
            raise ValueError(f"DAG needs gamma > 0 and max_iters >= 1; got gamma={gamma}, max_iters={max_iters}")
        self.gamma, self.max_iters, self.seed, self.background = gamma, max_iters, seed, background

    def perturb(self, logits_fn: TargetLogits, x: torch.Tensor, labels: torch.Tensor,
                valid: torch.Tensor | None = None, adv_labels: torch.Tensor | None = None,
                progress: Callable[[int, int], None] | None = None, indices: list[int] | None = None) -> DAGResult:
        """``labels`` (N, T) class per target; ``valid`` (N, T) which targets count (default: non-background);
        ``adv_labels`` (N, T) overrides pi (fooling images, Sec 2.3.4: an arbitrary target label map);
        ``progress(m, active)`` is called once per iteration with the active target count; ``indices`` are the
        images' indices in their split (default 0..N-1; they seed each image's pi). A converged image leaves the
        batch: it no longer moves, so its active set stays empty."""
        x = x.detach()
        n = x.shape[0]
        valid = (labels != self.background) if valid is None else valid
        if adv_labels is None:
            adv_labels = self._permuted_labels(logits_fn, x, labels, indices)
        x_adv, history = x.clone(), []
        iters = torch.full((n,), self.max_iters, dtype=torch.long, device=x.device)
        done = ~valid.any(1).to(x.device)  # an image without targets never enters the batch
        for m in range(self.max_iters + 1):  # the last pass only checks X_{M_0}
            rows = torch.nonzero(~done).flatten()
            live = valid[:0]
            if len(rows):
                xr = x_adv[rows].requires_grad_(m < self.max_iters)
                with torch.set_grad_enabled(m < self.max_iters):
                    logits = logits_fn(xr, rows)
                live = valid[rows] & (logits.argmax(-1) == labels[rows])
            active = torch.zeros_like(valid)
            active[rows] = live
            history.append(active.sum(1).tolist())
            if progress is not None:
                progress(m, int(live.sum()))
            done = ~active.any(1)
            iters = torch.where(done & (iters == self.max_iters), torch.full_like(iters, m), iters)
            if bool(done.all()) or m == self.max_iters:
                break
            gap = logits.gather(-1, adv_labels[rows][..., None]) - logits.gather(-1, labels[rows][..., None])
            (r,) = torch.autograd.grad((gap.squeeze(-1) * live).sum(), xr)
            scale = self.gamma / r.flatten(1).abs().amax(1).clamp_min(1e-12)
            step = r * (scale * live.any(1)).view(-1, *([1] * (x.dim() - 1)))
            x_adv[rows] = (xr.detach() + step).clamp(0, 1)
        return DAGResult(x_adv, x_adv - x, adv_labels, iters, done, history)

    def _permuted_labels(self, logits_fn: TargetLogits, x: torch.Tensor, labels: torch.Tensor,
                         indices: list[int] | None) -> torch.Tensor:
        """l'_n = pi(l_n) with each image's pi drawn from its split index; C read from one image's logits."""
        if x.shape[0] == 0:
            return labels.clone()
        with torch.no_grad():
            c = logits_fn(x[:1], torch.zeros(1, dtype=torch.long, device=x.device)).shape[-1]
        idx = list(range(x.shape[0])) if indices is None else indices
        return image_permutations(c, idx, self.seed).to(labels.device).gather(1, labels)


def perceptibility(r: torch.Tensor) -> torch.Tensor:
    """Sec 2.3.5: p = sqrt(1/K sum_k ||r_k||_2^2) per image, r_k the RGB vector of pixel k (r on [0, 1] images)."""
    return r.pow(2).sum(1).flatten(1).mean(1).sqrt()


def permuted(r: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The PERM control of Sec 2.3.5: r with its rows and its columns randomly permuted (one draw per image, the same
    for every channel): the same values and perceptibility, without the structure DAG gave them."""
    out = torch.empty_like(r)
    h, w = r.shape[-2:]
    for i in range(r.shape[0]):
        rows, cols = torch.randperm(h, generator=g), torch.randperm(w, generator=g)
        out[i] = r[i][..., rows, :][..., cols]
    return out


def segmentation_logits(model: torch.nn.Module) -> TargetLogits:
    """A segmentation model's (N, C, H, W) output (torchvision's ``["out"]`` too) as (N, H*W, C) target logits (every
    image has the same pixel targets, so ``rows`` is not needed)."""
    def fn(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        return out.flatten(2).transpose(1, 2)
    return fn


__all__ = ["DAG", "DAGResult", "GAMMA", "TargetLogits", "derangement", "image_permutations", "perceptibility", "permuted", "segmentation_logits"]
