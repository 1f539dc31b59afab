"""Attacks: small objects with one call, ``attack(model, x, y) -> x_adv``, injected into the engine.

Every attack object has ``perturb(model, x, y) -> AttackResult(x_adv, target, success)``, ``__call__(model, x, y) ->
x_adv``, attributes ``name``, ``eps`` (fraction of [0, 1]), ``iters`` (steps or queries), ``targeted``, ``seed``,
``step`` and ``reseed(seed)``; it runs inside ``attack_mode(model)`` and draws all randomness from its own seeded
generator. ``build_attack`` turns a training config (0..255 units) into one; ``make_attack`` builds the evaluation
suite's attacks by name (budgets already fractions). Layer: above models and config; below distributed, evaluation and
training.
"""
from __future__ import annotations

from typing import Any

import torch

from atscale.config.units import to_fraction
from atscale.errors import ConfigError
from atscale.attacks.adaptive import BPDA, EOT, Quantize
from atscale.attacks.apgd import APGD, APGDT, apgd_checkpoints
from atscale.attacks.base import Attack, AttackResult, NoAttack, SeededAttack, attack_mode
from atscale.attacks.composite import Composite, CompositeResult
from atscale.attacks.fab import FABT
from atscale.attacks.fgsm import fgsm_rs
from atscale.attacks.geometry import lp_norm, project
from atscale.attacks.losses import cw_margin, dlr_loss, least_likely_targets, margin, targeted_dlr_loss, top_targets
from atscale.attacks.minimal_norm import CWL2, DDN, MinNormResult
from atscale.attacks.pgd import PGD
from atscale.attacks.spatial import STA
from atscale.attacks.square import Square
from atscale.attacks.transfer import (AllOrNothingResult, LogitEnsemble, TransferFGSM, TransferResult, all_or_nothing,
                                      all_or_nothing_eval, default_transfer_iters, transfer_eval)
from atscale.attacks.wasserstein import FWA

ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "standard", "i-fgsm", "mi-fgsm",
                "di2-fgsm", "m-di2-fgsm", "ti-fgsm", "ddn", "cw-l2", "sta", "fwa")
# the threat model of the attacks whose budget is not an Lp ball of pixel values: the flow's largest component in
# pixels (STA), the transport cost (FWA); DDN and CW-L2 are L2 only
OWN_NORM = {"ddn": "l2", "cw-l2": "l2", "sta": "flow", "fwa": "wasserstein"}
NORMS = ("linf", "l2", "flow", "wasserstein")

# (momentum mu, diversity probability p, TI kernel size: 0 = off, None = scaled default) per transfer attack (Fig 3.2)
_TRANSFER = {"i-fgsm": (0.0, 0.0, 0), "mi-fgsm": (1.0, 0.0, 0), "di2-fgsm": (0.0, 0.5, 0),
             "m-di2-fgsm": (1.0, 0.5, 0), "ti-fgsm": (0.0, 0.0, None)}


def build_attack(attack_cfg, amp_dtype: torch.dtype | None = None, seed: int = 0):
    """The training attack of an ``AttackCfg`` (budgets in 0..255 pixel units, converted by
    :func:`atscale.config.units.to_fraction`) as an attack object (budgets as fractions).

    ``apgd``: APGD-CE (Croce & Hein 2020) with ``attack.iters`` steps at ``attack.eps``, as Singh et al. 2023 train
    (2 steps, untargeted: ``attack.targeted=false``; from the clean image: ``attack.clean_start_prob=1``). Its step
    size starts at 2 eps and adapts, so ``attack.step`` is unused and the step-only warmup (``attack.warmup=step``)
    is refused; the eps warmup scales eps (and with it the initial step)."""
    eps, step = to_fraction(attack_cfg.eps), to_fraction(attack_cfg.step)
    if attack_cfg.name == "none" or eps == 0:
        return NoAttack()
    if attack_cfg.name == "fgsm":
        return fgsm_rs(eps, step, attack_cfg.targeted, amp_dtype, seed)
    if attack_cfg.name == "apgd":
        if attack_cfg.warmup == "step" and attack_cfg.warmup_epochs > 0:
            raise ConfigError("attack.warmup = 'step' ramps the step size, but APGD (attack.name = 'apgd') has none "
                              "to ramp: its step starts at 2 eps and adapts itself",
                              "use attack.warmup=eps_and_step (eps and APGD's initial step grow together), or "
                              "attack.name=pgd for the ARES step ramp")
        return APGD(eps, attack_cfg.iters, loss="ce", targeted=attack_cfg.targeted,
                    target_mode=getattr(attack_cfg, "target_mode", "random"), seed=seed, amp_dtype=amp_dtype,
                    clean_start_prob=attack_cfg.clean_start_prob)
    return PGD(eps, step, attack_cfg.iters, attack_cfg.targeted, attack_cfg.clean_start_prob, attack_cfg.start_mode,
               amp_dtype, seed=seed, target_mode=getattr(attack_cfg, "target_mode", "random"))


def _take(kw: dict[str, Any], allowed: tuple[str, ...], name: str) -> dict[str, Any]:
    extra = sorted(set(kw) - set(allowed))
    if extra:
        raise TypeError(f"make_attack({name!r}) got unexpected keyword(s) {extra}; allowed: {sorted(allowed)}")
    return dict(kw)


def _own_norm(name: str, eps: float, steps: int, restarts: int, targeted: bool, kw: dict[str, Any],
              common: dict[str, Any]) -> SeededAttack:
    """DDN, CW-L2 (L2), STA (flow) and FWA (Wasserstein): the ARN paper's unseen attack types."""
    if restarts != 1:
        raise ValueError(f"{name} has no restarts; got restarts={restarts}")
    allowed = {"ddn": ("alpha", "gamma", "init_norm", "target_mode"),
               "cw-l2": ("search_steps", "initial_const", "lr", "kappa", "target_mode"),
               "sta": ("tau", "lr", "kappa", "target_mode"),
               "fwa": ("kernel_size", "entropy", "bisections", "target_mode")}[name]
    cls = {"ddn": DDN, "cw-l2": CWL2, "sta": STA, "fwa": FWA}[name]
    return cls(eps, steps, targeted=targeted, **_take(kw, allowed, name), **common)


def _standard(eps: float, steps: int, norm: str, restarts: int, targeted: bool, seed: int,
              amp_dtype: torch.dtype | None, kw: dict[str, Any]) -> Composite:
    """AutoAttack's "standard" composite (Croce & Hein 2020): its parts in order, each with its own seed."""
    kw = _take(kw, ("square_queries", "n_target_classes", "attacks"), "standard")
    if targeted:
        raise ValueError("'standard' measures robust accuracy (success = misclassified); targeted=True is not "
                         "meaningful for it")
    if norm != "linf":
        raise ValueError("'standard' is Linf only here (FAB-T and Square are implemented for Linf); for L2 use "
                         "apgd-ce and apgd-t with norm='l2'")
    parts = tuple(kw.get("attacks", ("apgd-ce", "apgd-t", "fab-t", "square")))
    n_t = kw.get("n_target_classes", 9)
    built = []
    for i, part in enumerate(parts):
        sub = dict(seed=seed + i, amp_dtype=amp_dtype)
        if part == "apgd-ce":
            built.append(APGD(eps, steps, norm=norm, loss="ce", restarts=restarts, **sub))
        elif part == "apgd-t":
            built.append(APGDT(eps, steps, n_target_classes=n_t, norm=norm, **sub))
        elif part == "fab-t":
            built.append(FABT(eps, steps, n_target_classes=n_t, **sub))
        elif part == "square":
            built.append(Square(eps, kw.get("square_queries", 5000), **sub))
        else:
            raise ValueError(f"'standard' runs a subset of apgd-ce, apgd-t, fab-t, square; got {part!r}")
    return Composite(built, name="standard", norm=norm, iters=steps, seed=seed, amp_dtype=amp_dtype)


def make_attack(name: str, *, eps: float, steps: int, norm: str | None = None, restarts: int = 1,
                targeted: bool = False, seed: int = 0, amp_dtype: torch.dtype | None = None,
                **kw: Any) -> SeededAttack:
    """An evaluation attack by name; ``eps`` is a fraction of the [0, 1] range (8/255, not 8) for linf / l2, in
    its own units for sta / fwa. ``norm``: linf by default, the attack's own threat model for ddn, cw-l2, sta, fwa.

    ``steps``: iterations (pgd, apgd-*, fab-t, the FGSM family; 0 there = the thesis default min(eps + 4, 1.25 eps)),
    queries (square), or APGD/FAB iterations inside "standard". ``restarts``: random restarts (per target class for
    apgd-t / fab-t). ``targeted``: success = classified as a per-example target (``target_mode`` "random" or
    "least_likely"); apgd-t / fab-t with targeted=False are AutoAttack's: top-k target classes, success =
    misclassified. Extra keywords per attack:
      pgd: step (default 2.5 eps / steps), keep_best (True), clean_start_prob, start_mode, target_mode
      apgd-ce / apgd-dlr: rho, momentum, target_mode;  apgd-t: + n_target_classes (9)
      fab-t: n_target_classes (9), alpha_max, eta, beta, target_mode
      square: p_init (0.8), rescale_schedule, target_mode
      standard: square_queries (5000), n_target_classes (9), attacks (subset/order of its four names)
      i-/mi-/di2-/m-di2-/ti-fgsm: step (1/255), momentum, diversity_prob, diversity_ratio, kernel_size, resize_back,
        target_mode
      ddn (norm l2): alpha, gamma, init_norm, target_mode;  cw-l2 (norm l2): search_steps, initial_const, lr, kappa,
        target_mode (minimal-norm attacks answering inside the L2 ball of radius eps)
      sta (norm "flow": eps = the largest flow component in pixels): tau, lr, kappa, target_mode
      fwa (norm "wasserstein": eps = the transport cost): kernel_size, entropy, bisections, target_mode
    """
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACK_NAMES)}")
    norm = norm or OWN_NORM.get(name, "linf")
    if name in OWN_NORM and norm != OWN_NORM[name]:
        raise ValueError(f"{name} attacks in the {OWN_NORM[name]!r} threat model; got norm={norm!r}")
    if norm not in ("linf", "l2") and name not in OWN_NORM:
        raise ValueError(f"norm must be 'linf' or 'l2' for {name}; got {norm!r}")
    if steps < 0 or (steps == 0 and name not in _TRANSFER):
        raise ValueError(f"{name}: steps must be >= 1 (0 allowed only for the FGSM transfer family); got {steps}")
    common = dict(seed=seed, amp_dtype=amp_dtype)
    if name == "pgd":
        kw = _take(kw, ("step", "keep_best", "clean_start_prob", "start_mode", "target_mode"), name)
        step = kw.pop("step", None) or 2.5 * eps / steps
        keep_best = kw.pop("keep_best", True)
        atk = PGD(eps, step, steps, targeted, kw.pop("clean_start_prob", 0.0), kw.pop("start_mode", "per_example"),
                  amp_dtype, keep_best, seed, norm=norm, restarts=restarts, **kw)
    elif name in ("apgd-ce", "apgd-dlr"):
        kw = _take(kw, ("rho", "momentum", "target_mode"), name)
        atk = APGD(eps, steps, norm=norm, loss="ce" if name == "apgd-ce" else "dlr", restarts=restarts,
                   targeted=targeted, **kw, **common)
        atk.name = name
    elif name == "apgd-t":
        kw = _take(kw, ("rho", "momentum", "target_mode", "n_target_classes"), name)
        atk = APGDT(eps, steps, norm=norm, restarts=restarts, targeted=targeted, **kw, **common)
    elif name == "fab-t":
        kw = _take(kw, ("n_target_classes", "alpha_max", "eta", "beta", "target_mode"), name)
        atk = FABT(eps, steps, norm=norm, restarts=restarts, targeted=targeted, **kw, **common)
    elif name == "square":
        kw = _take(kw, ("p_init", "rescale_schedule", "target_mode"), name)
        atk = Square(eps, steps, norm=norm, restarts=restarts, targeted=targeted, **kw, **common)
    elif name in OWN_NORM:
        atk = _own_norm(name, eps, steps, restarts, targeted, kw, common)
    elif name == "standard":
        atk = _standard(eps, steps, norm, restarts, targeted, seed, amp_dtype, kw)
    else:
        kw = _take(kw, ("step", "momentum", "diversity_prob", "diversity_ratio", "kernel_size", "resize_back",
                        "target_mode"), name)
        mu, p, k = _TRANSFER[name]
        if norm != "linf":
            raise ValueError(f"{name} is Linf only")
        if restarts != 1:
            raise ValueError(f"{name} has no random start, so restarts must be 1; got {restarts}")
        atk = TransferFGSM(eps, kw.pop("step", None), steps or None, momentum=kw.pop("momentum", mu),
                           diversity_prob=kw.pop("diversity_prob", p), kernel_size=kw.pop("kernel_size", k),
                           targeted=targeted, name=name, **kw, **common)
    return atk


__all__ = ["ATTACK_NAMES", "APGD", "APGDT", "AllOrNothingResult", "Attack", "AttackResult", "BPDA", "CWL2",
           "Composite", "CompositeResult", "DDN", "EOT", "FABT", "FWA", "MinNormResult", "NORMS", "OWN_NORM", "STA",
           "LogitEnsemble", "NoAttack", "PGD", "Quantize", "SeededAttack", "Square", "TransferFGSM",
           "TransferResult", "all_or_nothing", "all_or_nothing_eval", "apgd_checkpoints", "attack_mode",
           "build_attack", "cw_margin", "default_transfer_iters", "dlr_loss", "fgsm_rs", "least_likely_targets",
           "lp_norm", "make_attack", "margin", "project", "targeted_dlr_loss", "top_targets", "transfer_eval"]
