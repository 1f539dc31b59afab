"""FAB-T, the targeted fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial examples with
a fast adaptive boundary attack", Sec 3, Algorithm 1), Linf, as run inside AutoAttack's "standard" ensemble.

At each iterate x_i, the decision boundary between the true class c and the target t is linearised,
g(z) ~ g(x_i) + <grad g(x_i), z - x_i> with g = f_t - f_c, and two box-constrained minimal-Linf projections onto that
hyperplane are computed: delta_i from x_i and delta_orig from the original point x_orig. The update is
  x_{i+1} = clip_[0,1]((1 - a)(x_i + eta delta_i) + a (x_orig + eta delta_orig)),
  a = min(||delta_i|| / (||delta_i|| + ||delta_orig||), alpha_max),  eta = 1.05 (overshoot),  alpha_max = 0.1;
when x_{i+1} is adversarial it is recorded if closer to x_orig than the best so far and pulled back,
x_{i+1} = (1 - beta) x_orig + beta x_{i+1} (beta = 0.9). Restarts after the first start at a random point at Linf
distance min(best, eps) / 2 from x_orig. FAB-T runs one target per restart among the most likely wrong classes
(default 9). As an eps-bounded evaluator it reports success when the minimal adversarial example found lies within
eps; the returned x_adv is that example (success) or x itself. ``targeted=True`` (hit the target, not only leave c)
linearises the boundary between t and its strongest competitor at the current iterate instead of c.
"""
from __future__ import annotations

import torch
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.geometry import lp_norm
from atscale.attacks.losses import check_target_mode, draw_targets, top_targets

__all__ = ["FABT", "linf_hyperplane_projection"]


def linf_hyperplane_projection(z: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Minimal-Linf delta with <w, delta> = r and z + delta in [0, 1] (exact, per example; FAB Sec 3.1 for p = inf).

    For a bound t, the largest reachable <w, delta> is h(t) = sum_i |w_i| min(t, b_i), b_i the distance from z_i to the
    box in the direction sign(w_i); h is piecewise linear and non-decreasing, so the smallest t with h(t) = r is found
    by sorting the b_i. When r exceeds h(max b), the box corner in direction w is returned (the closest one can get).
    """
    n = z.shape[0]
    zf, wf = z.flatten(1), w.flatten(1)
    flip = r < 0
    wf = torch.where(flip[:, None], -wf, wf)
    r = r.abs()
    aw = wf.abs()
    b = torch.where(wf > 0, 1 - zf, zf).clamp_min(0)
    b_sorted, order = b.sort(1)
    aw_sorted = aw.gather(1, order)
    cum_w = aw_sorted.cumsum(1)
    cum_wb = (aw_sorted * b_sorted).cumsum(1)
    total = cum_w[:, -1:]
    h = cum_wb + b_sorted * (total - cum_w)  # h(b_(k)), non-decreasing in k
    k = torch.searchsorted(h.contiguous(), r[:, None].contiguous()).clamp(max=h.shape[1] - 1)
    prev_wb = torch.where(k > 0, cum_wb.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(r[:, None]))
    prev_w = torch.where(k > 0, cum_w.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(r[:, None]))
    t = (r[:, None] - prev_wb) / (total - prev_w).clamp_min(1e-12)
    t = torch.where(h[:, -1:] < r[:, None], b_sorted[:, -1:], t).clamp_min(0)
    delta = wf.sign() * torch.minimum(t.expand_as(b), b)  # <wf, delta> = |r|, i.e. <w, delta> = r
    return delta.view(n, *z.shape[1:])


def _strongest_other(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return logits.scatter(1, t[:, None], float("-inf")).argmax(1)


class FABT(SeededAttack):
    """Targeted FAB (Linf). ``targeted=False`` (AutoAttack): targets are the 1st..n_target_classes-th most likely wrong
    classes, one per restart block, success = misclassified within eps. ``targeted=True``: one target per example from
    ``target_mode``, success = classified as the target within eps."""

    name = "fab-t"

    def __init__(self, eps: float, iters: int = 100, *, n_target_classes: int = 9, restarts: int = 1,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, targeted: bool = False,
                 target_mode: str = "random", norm: str = "linf", seed: int = 0,
                 amp_dtype: torch.dtype | None = None):
        if norm != "linf":
            raise ValueError("FAB-T is implemented for norm='linf' only")
        if not 0 < eps <= 1 or iters < 1 or restarts < 1 or n_target_classes < 1:
            raise ValueError(f"FAB-T needs 0 < eps <= 1, iters >= 1, restarts >= 1, n_target_classes >= 1; got "
                             f"eps={eps}, iters={iters}, restarts={restarts}, n_target_classes={n_target_classes}")
        self.eps, self.iters, self.norm = eps, iters, norm
        self.n_target_classes, self.restarts = n_target_classes, restarts
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        self.targeted = targeted
        self.target_mode = check_target_mode(target_mode)
        self.amp_dtype = amp_dtype
        self._init_rng(seed)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        x = x.detach()
        g = self.generator(x.device)
        n = x.shape[0]
        with attack_mode(model):
            with torch.no_grad():
                clean = self._logits(model, x)
            pred = clean.argmax(1)
            best = torch.full((n,), float("inf"), device=x.device)
            x_best = x.clone()
            if self.targeted:
                t = target if target is not None else draw_targets(clean, y, self.target_mode, g)
                done = pred == t
                best[done] = 0.0
                targets = [t]
                used = t
            else:
                done = pred != y  # already misclassified: nothing to do
                best[done] = 0.0
                n_t = min(self.n_target_classes, clean.shape[1] - 1)
                targets = [top_targets(clean, y, r) for r in range(1, n_t + 1)]
                used = targets[0].clone()
            for t in targets:
                for rs in range(self.restarts):
                    todo = (best > self.eps).nonzero().squeeze(1)
                    if todo.numel() == 0:
                        break
                    xb, nb = self._run(model, x[todo], y[todo], t[todo], best[todo], g, random_start=rs > 0)
                    better = nb < best[todo]
                    idx = todo[better]
                    x_best[idx], best[idx] = xb[better], nb[better]
                    used[idx] = t[idx]
            ok = best <= self.eps
            x_adv = torch.where(ok.view(-1, 1, 1, 1), torch.min(torch.max(x_best, x - self.eps), x + self.eps), x)
            x_adv = x_adv.clamp(0, 1)
            with torch.no_grad():
                p = self._logits(model, x_adv).argmax(1)
            success = (p == used) if self.targeted else (p != y)
            x_adv = torch.where(success.view(-1, 1, 1, 1), x_adv, x)
        return AttackResult(x_adv, used, success)

    def _adversarial(self, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == t if self.targeted else logits.argmax(1) != y

    def _run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, best0: torch.Tensor,
             g: torch.Generator, random_start: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run towards t: (closest adversarial point found, its Linf distance; inf where none was found)."""
        n = x0.shape[0]
        view = (-1,) + (1,) * (x0.dim() - 1)
        x_out = x0.clone()
        best = torch.full((n,), float("inf"), device=x0.device)
        xi = x0.clone()
        if random_start:
            u = torch.rand(x0.shape, generator=g, device=x0.device, dtype=x0.dtype) * 2 - 1
            u = u / lp_norm(u, "linf").clamp_min(1e-12).view(view)
            rad = torch.minimum(best0, torch.full_like(best0, self.eps)) * 0.5
            xi = (x0 + u * rad.view(view)).clamp(0, 1)
        ar = torch.arange(n, device=x0.device)
        for _ in range(self.iters):
            xg = xi.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self._logits(model, xg)
                # AutoAttack's FAB-T: the boundary between the true class and t. Hitting t itself: the boundary
                # between t and its strongest competitor at the current iterate.
                other = _strongest_other(logits.detach(), t) if self.targeted else y
                diff = logits[ar, t] - logits[ar, other]
            (w,) = torch.autograd.grad(diff.sum(), xg)
            diff = diff.detach()
            d_i = linf_hyperplane_projection(xi, w, -diff)
            r_orig = -diff - (w * (x0 - xi)).flatten(1).sum(1)
            d_o = linf_hyperplane_projection(x0, w, r_orig)
            n_i, n_o = lp_norm(d_i, "linf"), lp_norm(d_o, "linf")
            a = (n_i / (n_i + n_o).clamp_min(1e-12)).clamp(max=self.alpha_max).view(view)
            xi = ((1 - a) * (xi + self.eta * d_i) + a * (x0 + self.eta * d_o)).clamp(0, 1)
            with torch.no_grad():
                adv = self._adversarial(self._logits(model, xi), y, t)
            dist = lp_norm(xi - x0, "linf")
            closer = adv & (dist < best)
            x_out[closer], best[closer] = xi[closer], dist[closer]
            xi = torch.where(adv.view(view), (1 - self.beta) * x0 + self.beta * xi, xi)
        return x_out, best
