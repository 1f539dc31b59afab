"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search", Sec 3, Algorithms 1-2), Linf: score-based, no gradients.

Start: vertical stripes, each column of each channel at +eps or -eps (then clipped to [0, 1]). Each iteration draws a
square of side s = round(sqrt(p * H * W)) (at least 1, at most H - 1) at a random position and sets the perturbation
inside it to +eps or -eps per channel; the candidate is kept if it lowers the loss (margin z_y - max_{j != y} z_j
untargeted, cross-entropy to the target when targeted). Only examples not yet successful are queried. The fraction p
starts at p_init (0.8 in AutoAttack) and is halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a
10000-query budget, the iteration rescaled to the actual budget. ``iters`` is the number of queries per example.
Everything runs under ``torch.no_grad()``: the model's backward is never called.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import AttackResult, SeededAttack, attack_mode
from atscale.attacks.losses import check_target_mode, margin

__all__ = ["Square", "square_p"]

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(it: int, queries: int, p_init: float, rescale: bool = True) -> float:
    """Fraction of pixels changed at iteration ``it`` (the published schedule for a 10000-query budget)."""
    i = int(it / queries * 10000) if rescale else it
    return p_init / 2 ** sum(i > h for h in _HALVINGS)


class Square(SeededAttack):
    name = "square"

    def __init__(self, eps: float, queries: int = 5000, *, p_init: float = 0.8, restarts: int = 1,
                 targeted: bool = False, target_mode: str = "random", norm: str = "linf", rescale_schedule: bool = True,
                 seed: int = 0, amp_dtype: torch.dtype | None = None):
        if norm != "linf":
            raise ValueError("the Square attack is implemented for norm='linf' only")
        if not 0 < eps <= 1 or queries < 1 or restarts < 1 or not 0 < p_init <= 1:
            raise ValueError(f"Square needs 0 < eps <= 1, queries >= 1, restarts >= 1, 0 < p_init <= 1; got eps={eps}, "
                             f"queries={queries}, restarts={restarts}, p_init={p_init}")
        self.eps, self.iters, self.norm = eps, queries, norm
        self.step = eps
        self.p_init, self.restarts, self.rescale = p_init, restarts, rescale_schedule
        self.targeted = targeted
        self.target_mode = check_target_mode(target_mode)
        self.amp_dtype = amp_dtype
        self.queries_used: torch.Tensor | None = None  # per example, of the last perturb call
        self._init_rng(seed)

    def _scores(self, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """(loss to minimise, margin: negative = success)."""
        if t is None:
            m = margin(logits, y)
            return m, m
        return F.cross_entropy(logits, t, reduction="none"), -margin(logits, t)

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> AttackResult:
        x = x.detach()
        g = self.generator(x.device)
        with attack_mode(model):
            t = None
            if self.targeted:
                t = target if target is not None else self._targets(model, x, y, g)
            x_adv = x.clone()
            success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
            queries = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            for _ in range(self.restarts):
                todo = (~success).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                xa, lo, s, q = self._run(model, x[todo], y[todo], None if t is None else t[todo], g)
                take = s | (lo < best_loss[todo])
                idx = todo[take]
                x_adv[idx], best_loss[idx], success[idx] = xa[take], lo[take], s[take]
                queries[todo] += q
            self.queries_used = queries
        return AttackResult(x_adv, t, success)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        eps = self.eps
        stripes = torch.randint(0, 2, (n, c, 1, w), generator=g, device=x.device).to(x.dtype) * 2 - 1
        x_best = (x + eps * stripes).clamp(0, 1)
        loss, marg = self._scores(self._logits(model, x_best), y, t)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        for it in range(1, self.iters):
            active = (marg >= 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            m = active.numel()
            p = square_p(it, self.iters, self.p_init, self.rescale)
            s = max(1, min(int(round(math.sqrt(p * h * w))), min(h, w) - 1))
            xa, xo = x_best[active], x[active]
            r0 = torch.randint(0, h - s + 1, (m,), generator=g, device=x.device)
            c0 = torch.randint(0, w - s + 1, (m,), generator=g, device=x.device)
            in_r = (rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + s)
            in_c = (cols[None] >= c0[:, None]) & (cols[None] < c0[:, None] + s)
            window = (in_r[:, None, :, None] & in_c[:, None, None, :])
            signs = torch.randint(0, 2, (m, c, 1, 1), generator=g, device=x.device).to(x.dtype) * 2 - 1
            cand = torch.where(window, (xo + eps * signs).clamp(0, 1), xa)
            for _ in range(10):  # a square that changes nothing wastes a query: redraw its signs (Alg. 2)
                same = ((cand - xa).abs().flatten(1).amax(1) == 0)
                if not bool(same.any()):
                    break
                resign = torch.randint(0, 2, (m, c, 1, 1), generator=g, device=x.device).to(x.dtype) * 2 - 1
                signs = torch.where(same.view(-1, 1, 1, 1), resign, signs)
                cand = torch.where(window, (xo + eps * signs).clamp(0, 1), xa)
            new_loss, new_marg = self._scores(self._logits(model, cand), y[active], None if t is None else t[active])
            queries[active] += 1
            better = new_loss < loss[active]
            idx = active[better]
            x_best[idx], loss[idx], marg[idx] = cand[better], new_loss[better], new_marg[better]
        return x_best, loss, marg < 0, queries
