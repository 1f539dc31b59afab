"""Objectives that train a pre-processor P in front of a target classifier T (``defense.preprocessor``; the defended
model is T(P(x)), :class:`atscale.defenses.model.DefendedModel`).

- ``jatp``: JATP (Zhou et al., "Improving White-box Robustness of Pre-processing Defenses via Joint Adversarial
  Training", ``zhou-jatp-...``, Sec 3, Algorithm 1). *Full* adversarial examples (Eq. 5): PGD through the whole model
  T(P(.)) maximizing the mean squared distance of T's feature map at ``defense.feature_layer`` between x~ and x. Loss
  (Eq. 6-10): L_adv + beta * L_pix with
  L_adv = mean_i [BCE(T(P(x*_i)), y_i) + alpha * FSM_i * (1 - p_y(T(P(x_i))))] (Eq. 9), BCE the boosted cross-entropy
  of Eq. 7 (-log p_y - log(1 - max_{k != y} p_k)), FSM_i the mean squared distance of the feature maps of P(x*_i) and
  P(x_i) (Eq. 8), and L_pix the mean squared pixel difference of P(x*) and x (Eq. 6 prints ||P(x*) - x||_2; the
  un-normalized norm over a 3x32x32 image has a gradient of a few hundred at initialization and SGD at the paper's
  lr 1e-2 diverged in our runs, so atscale uses the per-pixel mean, the pixel loss of these codes). alpha 5,
  beta 3 (Sec 4). With
  ``defense.train: preprocessor`` T stays fixed (JATP); with ``both`` T and P are updated jointly (JATP').
- ``nrp_static``: the same network and loss on *static* (oblivious) adversarial examples: the training attack on T
  alone (Sec 2.2, Eq. 2), as the NRP baseline and the "Obl" models of the paper's Fig. 1 are trained.
- ``ape_g`` and ``arn``: APE-G and ARN, with discriminators (:mod:`atscale.training.gan_objectives`).
- ``hgd``: HGD (Liao et al. 2018, Sec 3.3, Eq. 2): the representation-guided L1 loss |f_l(P(x*)) - f_l(x)| of the
  fixed target's layer l (``defense.feature_layer``; empty = the logits, the LGD variant), on static adversarial
  examples of T.

The feature maps are read with forward hooks (:func:`atscale.layers.taps.tap`) in one forward pass over the
concatenated clean + adversarial batch, so a DDP step still has one forward per backward. Layer names are those of
``model.named_modules()`` of the defended model, e.g. ``net.layer3.1.conv2`` (a timm ResNet-18's last convolution
of its third stage; the paper's "last convolution layer in the third basic block").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import attack_mode
from atscale.attacks.geometry import random_in_ball
from atscale.attacks.pgd import signed_ascent
from atscale.layers.taps import check_module_names, tap
from atscale.training.objective_base import Objective, StepOutput, boosted_cross_entropy, unwrapped

__all__ = ["JATP", "HGDLoss", "build_preprocessor_objective"]


def _autocast(x: torch.Tensor, attack):
    dtype = getattr(attack, "amp_dtype", None)
    return torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class JATP(Objective):
    """``full=True``: JATP / JATP' (Eq. 5 examples); ``full=False``: ``nrp_static`` (static examples of T alone)."""

    def __init__(self, feature_layer: str, alpha: float = 5.0, beta: float = 3.0, full: bool = True) -> None:
        self.layer = f"net.{feature_layer}"
        self.alpha, self.beta, self.full = alpha, beta, full

    def bind(self, model: nn.Module) -> None:
        check_module_names(model.net, [self.layer.removeprefix("net.")], "defense.feature_layer")

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.full:
            return attack(model.classifier_view(), x, y)
        x = x.detach()
        if attack.eps == 0:
            return x
        g = attack.generator(x.device)
        with attack_mode(model), tap(model, [self.layer]) as out:
            with torch.no_grad(), _autocast(x, attack):
                model(x)
            ref = out[self.layer].float()

            def feature_distance(z: torch.Tensor) -> torch.Tensor:
                with _autocast(z, attack):
                    model(z)
                return (out[self.layer].float() - ref).square().flatten(1).mean(1)

            start = (x + random_in_ball(x, attack.eps, "linf", g)).clamp(0, 1)
            return signed_ascent(feature_distance, x, start, attack.eps, attack.step, attack.iters)

    def __call__(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        with tap(unwrapped(module), ["preprocessor", self.layer]) as out:
            clean, adv = module(torch.cat([x, x_adv])).float().chunk(2)
        f_clean, f_adv = out[self.layer].float().chunk(2)
        purified_adv = out["preprocessor"].float().chunk(2)[1]
        fsm = (f_adv - f_clean).square().flatten(1).mean(1)
        p_true_clean = F.softmax(clean, 1).gather(1, y[:, None]).squeeze(1)
        l_adv = boosted_cross_entropy(adv, y) + self.alpha * (fsm * (1.0 - p_true_clean)).mean()
        l_pix = (purified_adv - x).square().mean()
        return StepOutput(l_adv + self.beta * l_pix, adv, clean)


class HGDLoss(Objective):
    """HGD's representation-guided denoiser loss on static adversarial examples (``hgd``)."""

    def __init__(self, feature_layer: str = "") -> None:
        self.layer = f"net.{feature_layer}" if feature_layer else ""

    def bind(self, model: nn.Module) -> None:
        if self.layer:
            check_module_names(model.net, [self.layer.removeprefix("net.")], "defense.feature_layer")

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return attack(model.classifier_view(), x, y)

    def __call__(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = unwrapped(module)
        names = [self.layer] if self.layer else []
        with torch.no_grad(), tap(view := model.classifier_view(), names) as out:
            logits = view(x)
            target = (out[self.layer] if self.layer else logits).float()
        with tap(model, names) as out:
            adv = module(x_adv).float()
        rep = out[self.layer].float() if self.layer else adv
        loss = (rep - target).abs().flatten(1).mean(1).mean()
        return StepOutput(loss, adv)


def build_preprocessor_objective(cfg, defense) -> Objective:
    """The objective of ``objective.name`` in :data:`atscale.config.schema.PREPROCESSOR_OBJECTIVES`."""
    if cfg.name == "hgd":
        return HGDLoss(defense.feature_layer)
    if cfg.name in ("ape_g", "arn"):
        from atscale.training.gan_objectives import APEGObjective, ARNObjective

        if cfg.name == "ape_g":
            return APEGObjective(cfg.disc_lr, cfg.ape_mse_weight, cfg.ape_adv_weight)
        return ARNObjective(cfg.arn_attacks, cfg.arn_lambda1, cfg.arn_lambda2, cfg.arn_theta, cfg.disc_lr)
    return JATP(defense.feature_layer, cfg.jatp_alpha, cfg.jatp_beta, full=cfg.name == "jatp")
