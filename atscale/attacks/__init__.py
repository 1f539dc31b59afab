"""Attacks: small objects with one call, ``attack(model, x, y) -> x_adv``, injected into the engine."""
from __future__ import annotations

import torch

from atscale.attacks.base import Attack, NoAttack, attack_mode
from atscale.attacks.fgsm import fgsm_rs
from atscale.attacks.pgd import PGD, AttackResult


def build_attack(attack_cfg, amp_dtype: torch.dtype | None = None, seed: int = 0):
    """Config (budgets in 0..255 pixel units) -> attack object (budgets as fractions); the one place units convert."""
    eps, step = attack_cfg.eps / 255.0, attack_cfg.step / 255.0
    if attack_cfg.name == "none" or eps == 0:
        return NoAttack()
    if attack_cfg.name == "fgsm":
        return fgsm_rs(eps, step, attack_cfg.targeted, amp_dtype, seed)
    return PGD(eps, step, attack_cfg.iters, attack_cfg.targeted, attack_cfg.clean_start_prob, attack_cfg.start_mode,
               amp_dtype, seed=seed)


__all__ = ["Attack", "AttackResult", "NoAttack", "PGD", "attack_mode", "build_attack", "fgsm_rs"]
