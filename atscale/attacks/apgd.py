"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Sec 3, Algorithm 1) and its targeted-DLR variant APGD-T (Sec 4).

Per example, with f the loss to maximise and P the projection onto the eps-ball intersected with [0, 1]:
  x1 = P(x0 + eta0 * s(grad f(x0))),  eta0 = 2 eps,  s = sign (Linf) or grad / ||grad||_2 (L2)
  z_{k+1} = P(x_k + eta_k * s(grad f(x_k)))
  x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1})),  alpha = 0.75 (momentum)
At the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), the step is
halved and the iterate restarted from the best point found so far when
  Condition 1: fewer than rho (0.75) of the steps since w_{j-1} increased f, or
  Condition 2: the step was not halved at w_{j-1} and the best loss did not improve since w_{j-1}.
The best-loss point is tracked throughout; the returned point is the highest-loss successful iterate if any, else the
highest-loss iterate. Restarts (random starts) run only on the examples not yet successful.

As a training attack (Singh et al. 2023, "Revisiting Adversarial Training for ImageNet", Sec 3: 2-step APGD-CE at
eps 4/255, untargeted, from the clean image): ``clean_start_prob`` = 1 starts every example at x0 = x (0 keeps the
random start of the evaluation attack); the step size is not a parameter (eta0 = 2 eps, then halved at the checkpoints),
so ``set_budget`` sets eps and keeps step = 2 eps. N iterations cost N forward-backward passes plus one forward at the
last iterate (its loss picks the returned point; no gradient is taken there). With N = 1 there is no checkpoint; with
N = 2 the one checkpoint is w_1 = 1. Soft labels (Mixup / CutMix targets, shape (N, K)) work with the CE loss; success
is then judged against each example's dominant label.

APGD-T (AutoAttack's "standard" version): targeted DLR loss towards the 2nd, 3rd, ... most likely classes, one target
class per restart (default 9), success = misclassification (a robustness evaluation). ``targeted=True`` instead pushes
to one target per example (``target_mode``) and counts success as being classified as that target.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.geometry import check_norm, direction, project, random_in_ball
from atscale.attacks.losses import check_target_mode, dlr_loss, targeted_dlr_loss, top_targets

__all__ = ["APGD", "APGDT", "apgd_checkpoints"]

LOSSES = ("ce", "dlr")


def apgd_checkpoints(iters: int) -> list[int]:
    """Iterations w_j = ceil(p_j * iters) at which APGD checks its two conditions (p_0 = 0 excluded; none at or past
    the last iteration, so 1 iteration has none and 2 have w_1 = 1)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(round(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06), 10))
    ws = sorted({math.ceil(round(pj * iters, 6)) for pj in p[1:]})
    return [w for w in ws if 0 < w < iters]


class APGD(SeededAttack):
    """APGD with cross-entropy (``loss="ce"``, APGD-CE) or DLR (``loss="dlr"``, APGD-DLR); Linf or L2.

    Untargeted: maximise CE(y) / DLR(y); success = misclassified. ``targeted=True``: maximise -CE(t) / the targeted
    DLR towards t (``target_mode`` random or least_likely); success = classified as t. ``clean_start_prob``: the
    per-example probability of starting at the clean image instead of a uniform point of the ball."""

    name = "apgd-ce"

    def __init__(self, eps: float, iters: int = 100, *, norm: str = "linf", loss: str = "ce", restarts: int = 1,
                 targeted: bool = False, target_mode: str = "random", rho: float = 0.75, momentum: float = 0.75,
                 seed: int = 0, amp_dtype: torch.dtype | None = None, clean_start_prob: float = 0.0):
        check_norm(norm)
        if loss not in LOSSES:
            raise ValueError(f"APGD loss must be one of {LOSSES}; got {loss!r}")
        if eps <= 0 or (norm == "linf" and eps > 1) or iters < 1 or restarts < 1:
            raise ValueError(f"APGD needs 0 < eps (<= 1 for linf), iters >= 1, restarts >= 1; got eps={eps}, "
                             f"iters={iters}, restarts={restarts}")
        self.eps, self.iters, self.norm, self.loss = eps, iters, norm, loss
        self.step = 2 * eps  # eta^(0)
        self.restarts, self.targeted = restarts, targeted
        self.target_mode = check_target_mode(target_mode)
        self.rho, self.momentum = rho, momentum
        self.amp_dtype = amp_dtype
        self.clean_start_prob = clean_start_prob
        self.last_eta: torch.Tensor | None = None
        self._init_rng(seed)

    @property
    def checkpoints(self) -> list[int]:
        """The step-size checkpoints of the current ``iters`` (training phases may change it between calls)."""
        return apgd_checkpoints(self.iters)

    def set_budget(self, eps: float, step: float) -> None:
        """eps of the next calls (training's eps warmup and phases); ``step`` is ignored: APGD's starts at 2 eps."""
        self.eps, self.step = eps, 2 * eps

    # --- objectives -------------------------------------------------------------------------------------------------
    def _objective(self, y: torch.Tensor, t: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        if t is None:
            return (lambda z: F.cross_entropy(z, y, reduction="none")) if self.loss == "ce" else (
                lambda z: dlr_loss(z, y))
        if self.loss == "ce":
            return lambda z: -F.cross_entropy(z, t, reduction="none")
        return lambda z: targeted_dlr_loss(z, y, t, hit_target=True)

    def _succeeded(self, y: torch.Tensor, t: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        if t is not None:
            return lambda z: z.argmax(1) == t
        hard = y.argmax(1) if y.dim() == 2 else y  # soft (Mixup) targets: the dominant label
        return lambda z: z.argmax(1) != hard

    # --- attack -----------------------------------------------------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        x = x.detach()
        g = self.generator(x.device)
        with attack_mode(model):
            t = None
            if self.targeted:
                t = target if target is not None else self._targets(model, x, y, g)
            x_adv, success, best = self._restarts(model, x, y, t, g, self._objective, self._succeeded, self.restarts)
        return AttackResult(x_adv, t, success)

    def _restarts(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                  g: torch.Generator, objective, succeeded, restarts: int,
                  state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``restarts`` runs, each on the examples not yet successful, merged into ``state`` = (x, success, loss)."""
        if state is None:
            x_adv, success = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            best = torch.full((x.shape[0],), float("-inf"), device=x.device)
        else:
            x_adv, success, best = state
        for _ in range(restarts):
            todo = (~success).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            tt = None if t is None else t[todo]
            xs, ys = (x, y) if todo.numel() == x.shape[0] else (x[todo], y[todo])
            xa, s, lo = self._run(model, xs, ys, g, objective(ys, tt), succeeded(ys, tt))
            take = s | (lo > best[todo])
            idx = todo[take]
            x_adv[idx], success[idx], best[idx] = xa[take], s[take], lo[take]
        return x_adv, success, best

    def _loss_grad(self, model: nn.Module, x: torch.Tensor, objective, need_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x = x.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            logits = self._logits(model, x)
            loss = objective(logits)
        grad = torch.autograd.grad(loss.sum(), x)[0] if need_grad else None
        return loss.detach(), grad, logits.detach()

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, objective, succeeded
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run (Algorithm 1) from a random start: (returned point, success, its loss)."""
        n, norm, eps = x.shape[0], self.norm, self.eps
        view = (-1,) + (1,) * (x.dim() - 1)
        noise = random_in_ball(x, eps, norm, g)
        if self.clean_start_prob > 0:
            clean = torch.rand(n, generator=g, device=x.device) < self.clean_start_prob
            noise = torch.where(clean.view(view), torch.zeros_like(noise), noise)
        x_cur = project(x + noise, x, eps, norm)
        loss, grad, logits = self._loss_grad(model, x_cur, objective, self.iters > 0)
        found = succeeded(logits)
        x_found, found_loss = x_cur.clone(), torch.where(found, loss, torch.full_like(loss, float("-inf")))
        x_best, best_loss, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_prev = x_cur.clone()
        loss_prev = loss.clone()
        eta = torch.full((n,), 2 * eps, device=x.device, dtype=x.dtype)
        eta_at_check = eta.clone()  # eta^(w_{j-1}), before that checkpoint's halving
        best_at_check = best_loss.clone()
        increases = torch.zeros(n, device=x.device)
        last_check = 0
        checks = set(self.checkpoints)
        for k in range(self.iters):
            a = 1.0 if k == 0 else self.momentum
            z = project(x_cur + eta.view(view) * direction(grad, norm), x, eps, norm)
            x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)
            x_prev, x_cur = x_cur, x_new
            last = k == self.iters - 1
            loss, grad, logits = self._loss_grad(model, x_cur, objective, not last)
            s = succeeded(logits)
            upd = s & (loss > found_loss)
            x_found[upd], found_loss[upd] = x_cur[upd], loss[upd]
            found |= s
            increases += (loss > loss_prev).float()
            loss_prev = loss
            imp = loss > best_loss
            x_best[imp], best_loss[imp] = x_cur[imp], loss[imp]
            if not last:
                grad_best[imp] = grad[imp]
            it = k + 1
            if it in checks and not last:
                cond1 = increases < self.rho * (it - last_check)
                cond2 = (eta_at_check == eta) & (best_at_check == best_loss)
                red = cond1 | cond2
                eta_at_check = eta.clone()
                eta = torch.where(red, eta / 2, eta)
                x_cur, x_prev = x_cur.clone(), x_prev.clone()
                x_cur[red], x_prev[red], grad[red] = x_best[red], x_best[red], grad_best[red]
                loss_prev = torch.where(red, best_loss, loss_prev)
                best_at_check = best_loss.clone()
                increases.zero_()
                last_check = it
        self.last_eta = eta  # per-example step size at the end of the run (diagnostics: the halvings happened)
        x_out = torch.where(found.view(view), x_found, x_best)
        return x_out.detach(), found, torch.where(found, found_loss, best_loss)


class APGDT(APGD):
    """APGD-T: APGD with the targeted DLR loss, one run per target class among the ``n_target_classes`` most likely
    wrong classes (Croce & Hein 2020, Sec 4 and 5: 9 targets, 100 iterations each), each run only on the examples not
    yet broken; ``restarts`` random restarts per target. Success = misclassified (``targeted=False``, AutoAttack) or,
    with ``targeted=True``, classified as the one target per example chosen by ``target_mode``."""

    name = "apgd-t"

    def __init__(self, eps: float, iters: int = 100, *, n_target_classes: int = 9, norm: str = "linf",
                 restarts: int = 1, targeted: bool = False, target_mode: str = "random", rho: float = 0.75,
                 momentum: float = 0.75, seed: int = 0, amp_dtype: torch.dtype | None = None):
        super().__init__(eps, iters, norm=norm, loss="dlr", restarts=restarts, targeted=targeted,
                         target_mode=target_mode, rho=rho, momentum=momentum, seed=seed, amp_dtype=amp_dtype)
        if n_target_classes < 1:
            raise ValueError(f"n_target_classes must be >= 1; got {n_target_classes}")
        self.n_target_classes = n_target_classes

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        if self.targeted:
            return super().perturb(model, x, y, target)
        x = x.detach()
        g = self.generator(x.device)
        with attack_mode(model):
            with torch.no_grad():
                clean = self._logits(model, x)
            n_t = min(self.n_target_classes, clean.shape[1] - 1)
            state, used = None, torch.zeros_like(y)
            for rank in range(1, n_t + 1):
                t = top_targets(clean, y, rank)
                before = None if state is None else state[1].clone()

                def objective(yy: torch.Tensor, tt: torch.Tensor):
                    return lambda z: targeted_dlr_loss(z, yy, tt)

                def succeeded(yy: torch.Tensor, tt: torch.Tensor):
                    return lambda z: z.argmax(1) != yy

                state = self._restarts(model, x, y, t, g, objective, succeeded, self.restarts, state)
                newly = state[1] if before is None else state[1] & ~before
                used = torch.where(newly | (rank == 1), t, used)
                if bool(state[1].all()):
                    break
        return AttackResult(state[0], used, state[1])
