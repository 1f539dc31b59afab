"""Training objectives, one class per strategy: the thesis's (Intriguing Properties of Adversarial Training, Xie thesis
Sec 6.3-6.4; AdvProp, Chapter 7) and the peers' (ALP, TRADES, MART, "free" adversarial training).

Each objective has two parts that the engine calls per micro-batch:

- ``make_adv(model, attack, x, y)``: the inputs the loss needs beyond the clean batch, made with the unwrapped
  model (frozen parameters, eval-mode BN; ``atscale.attacks.base.attack_mode``). The default runs the training attack
  through the objective's ``attack_domain``.
- ``__call__(module, x, x_adv, y) -> StepOutput``: the loss through the (DDP / DeepSpeed) training module, whose
  backward the engine runs.

``y`` is a [B] tensor of class indices, or, for the cross-entropy objectives (``MIXUP_OBJECTIVES``: madry, clean,
mixed, ratio, alp, mbn, advprop) under Mixup / CutMix, [B, C] float soft targets (``atscale.training.mixing``) that
already carry ``objective.label_smoothing``; :func:`cross_entropy` then applies no smoothing of its own, so label
smoothing enters the loss once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atscale.attacks.base import attack_mode
from atscale.attacks.geometry import project
from atscale.attacks.pgd import signed_ascent
from atscale.config.schema import PREPROCESSOR_OBJECTIVES
from atscale.layers.context import domain, domain_split
from atscale.training.objective_base import Objective, StepOutput, boosted_cross_entropy, cross_entropy
from atscale.training.preprocessor_objectives import build_preprocessor_objective


class Madry(Objective):
    """100% adversarial: minimise J(adv) only (Madry et al. 2018; the IAT recipe)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x_adv)
        return StepOutput(cross_entropy(logits.float(), y, self.ls), logits)


class Clean(Objective):
    """Standard training on clean images: the baseline adversarial training is compared against."""

    needs_attack = False

    def __init__(self, label_smoothing: float = 0.0):
        self.ls = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(cross_entropy(logits.float(), y, self.ls), logits, logits)


class Mixed(Objective):
    """100% adv + 100% clean in one batch: a J(clean) + (1 - a) J(adv) (Goodfellow et al.; Sec 6.3, a = 0.5)."""

    def __init__(self, clean_weight: float = 0.5, label_smoothing: float = 0.0):
        self.a, self.ls = clean_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().chunk(2)
        loss = self.a * cross_entropy(clean, y, self.ls) + \
            (1 - self.a) * cross_entropy(adv, y, self.ls)
        return StepOutput(loss, adv, clean)


class CleanRatio(Objective):
    """All adversarial images plus a fraction r of their clean counterparts, with shared BNs, mean cross-entropy over
    the combined batch (Xie thesis Sec 6.4.1, Figure 6.1: clean images removed by 0..100%; r = 1 is the 50/50 mixed
    loss, r = 0 is Madry's 100% adversarial). The clean images kept are the first round(r n) of the batch."""

    def __init__(self, ratio: float, label_smoothing: float = 0.0):
        self.ratio, self.ls = ratio, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        k = int(round(self.ratio * x.shape[0]))
        logits = model(torch.cat([x[:k], x_adv])).float()
        loss = cross_entropy(logits, torch.cat([y[:k], y]), self.ls)
        return StepOutput(loss, logits[k:], logits[:k] if k == x.shape[0] else None)  # clean acc: whole batches


class LogitPairing(Objective):
    """Adversarial logit pairing (Kannan et al. 2018; compared in Xie thesis Sec 6.4.1): the mixed loss
    a J(clean) + (1 - a) J(adv) plus lambda * mean squared difference between clean and adversarial logits."""

    def __init__(self, weight: float, clean_weight: float = 0.5, label_smoothing: float = 0.0):
        self.lam, self.a, self.ls = weight, clean_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        clean, adv = model(torch.cat([x, x_adv])).float().chunk(2)
        loss = self.a * cross_entropy(clean, y, self.ls) + \
            (1 - self.a) * cross_entropy(adv, y, self.ls) + self.lam * F.mse_loss(adv, clean)
        return StepOutput(loss, adv, clean)


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax(p) || softmax(q))."""
    logp, logq = F.log_softmax(p_logits, 1), F.log_softmax(q_logits, 1)
    return (logp.exp() * (logp - logq)).sum(1)


class Trades(Objective):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximises the KL term inside the
    eps-ball by PGD (the training attack's eps, step and iterations; L-inf signed steps) from x + 0.001 N(0, I).

    The attack runs with eval-mode BN and frozen parameters like every attack here; the loss uses one forward pass
    over the concatenated clean + adversarial batch, so BN statistics are those of both (TRADES's code runs two
    passes; one pass keeps DDP to one forward per backward)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        self.beta, self.ls = beta, label_smoothing

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if attack.eps == 0:
            return x
        g = attack.generator(x.device)
        with domain(self.attack_domain), attack_mode(model):
            p_clean = attack._logits(model, x).detach()
            start = (x + 0.001 * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)).clamp(0, 1)
            return signed_ascent(lambda z: kl_rows(p_clean, attack._logits(model, z)), x, start, attack.eps,
                                 attack.step, attack.iters)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        clean, adv = model(torch.cat([x, x_adv])).float().chunk(2)
        loss = cross_entropy(clean, y, self.ls) + self.beta * kl_rows(clean, adv).mean()
        return StepOutput(loss, adv, clean)


class Mart(Objective):
    """MART (Wang et al. 2020): boosted CE on the adversarial example, BCE = -log p_y(x') - log(1 - max_{k != y}
    p_k(x')), plus lambda * KL(p(x) || p(x')) * (1 - p_y(x)), averaged over the batch; x' from the training attack
    (PGD on cross-entropy). One forward pass over clean + adversarial images (see ``Trades``)."""

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        clean, adv = model(torch.cat([x, x_adv])).float().chunk(2)
        bce = boosted_cross_entropy(adv, y)
        p_true_clean = F.softmax(clean, 1).gather(1, y[:, None]).squeeze(1)
        loss = bce + self.lam * (kl_rows(clean, adv) * (1.0 - p_true_clean)).mean()
        return StepOutput(loss, adv, clean)


class Free(Objective):
    """"Free" adversarial training (Shafahi et al. 2019): every minibatch is replayed m times; each replay is one
    optimizer step on x + delta whose single backward also gives the input gradient, and delta <- clip(delta +
    eps * sign(grad_x), -eps, eps) is carried to the next replay and the next minibatch. Train for epochs / m.

    The attack object only supplies eps (and its seed); BN layers are in training mode for the shared pass."""

    needs_attack = True

    def __init__(self, replays: int, label_smoothing: float = 0.0):
        self.replays, self.ls = replays, label_smoothing
        self.delta: torch.Tensor | None = None
        self._x_adv: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self.eps = 0.0

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.eps = float(attack.eps)
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        self.delta = self.delta.to(x.device, x.dtype)
        self._x = x.detach()
        self._x_adv = (self._x + self.delta).clamp(0, 1).requires_grad_(True)
        return self._x_adv

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x_adv).float()
        return StepOutput(cross_entropy(logits, y, self.ls), logits)

    def after_backward(self) -> None:
        grad = self._x_adv.grad
        if grad is None:
            raise RuntimeError("free training: the backward did not reach the input; the loss must depend on x_adv")
        self.delta = (project(self._x + self.delta + self.eps * grad.sign(), self._x, self.eps, "linf") - self._x).detach()
        self._x_adv = None

    def state_dict(self) -> dict:
        return {"delta": self.delta.cpu()} if self.delta is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.delta = state.get("delta")


class SplitBN(Objective):
    """Clean images through the clean BN domain and adversarial images through the adversarial (auxiliary) one, all
    other layers shared, in one forward pass over the concatenated batch; loss w_c J(clean) + w_a J(adv).

    - Mixture BN (Xie thesis Sec 6.4.2): 100% adv + 100% clean with separate BNs, w_c = a, w_a = 1 - a (a = 0.5);
      evaluate with either domain (MBN_clean or MBN_adv).
    - AdvProp (Xie thesis Sec 7.3, Algorithm 1): main BNs for clean images, auxiliary BNs for adversarial ones,
      loss L_clean + L_adv (w_c = w_a = 1); the auxiliary BNs are dropped at test time.
    The attack itself runs through the adversarial domain (``attack_domain``).
    """

    attack_domain = "adv"

    def __init__(self, clean_weight: float, adv_weight: float, label_smoothing: float = 0.0):
        self.wc, self.wa, self.ls = clean_weight, adv_weight, label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        n = x.shape[0]
        with domain_split(("clean", n), ("adv", x_adv.shape[0])):
            logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.float().split([n, x_adv.shape[0]])
        loss = self.wc * cross_entropy(clean, y, self.ls) + \
            self.wa * cross_entropy(adv, y, self.ls)
        return StepOutput(loss, adv, clean)


class FineGrainedAdvProp(Objective):
    """Fine-grained AdvProp (Xie thesis Sec 7.5.4, Table 7.5): one main BN for clean images without AutoAugment and two
    auxiliary BNs, one for the AutoAugment images and one for adversarial examples; loss L_clean + L_aug + L_adv.

    The adversarial examples are crafted from the AutoAugment images (the thesis trains every network with AutoAugment
    by default, so those are its training images), through the ``adv`` BNs. ``augment`` maps a float [0, 1] batch to
    its AutoAugment version (``atscale.data.augment.AutoAugmentBatch``).
    """

    attack_domain = "adv"
    domains = ("clean", "aug", "adv")

    def __init__(self, augment, label_smoothing: float = 0.0):
        self.augment, self.ls = augment, label_smoothing

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor):
        x_aug = self.augment(x)
        with domain(self.attack_domain):
            return x_aug, attack(model, x_aug, y)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv, y: torch.Tensor) -> StepOutput:
        x_aug, x_adv = x_adv
        n = x.shape[0]
        with domain_split(("clean", n), ("aug", n), ("adv", n)):
            logits = model(torch.cat([x, x_aug, x_adv]))
        clean, aug, adv = logits.float().split(n)
        loss = sum(cross_entropy(z, y, self.ls) for z in (clean, aug, adv))
        return StepOutput(loss, adv, clean)




def build_objective(cfg, augment=None, defense=None):
    """The objective of ``objective.*``; ``augment`` is the AutoAugment batch transform (fine-grained AdvProp);
    ``defense`` the ``defense`` section (pre-processor objectives: :mod:`.preprocessor_objectives`)."""
    if cfg.name in PREPROCESSOR_OBJECTIVES:
        return build_preprocessor_objective(cfg, defense)
    ls = cfg.label_smoothing
    simple = {"ratio": lambda: CleanRatio(cfg.clean_ratio, ls), "alp": lambda: LogitPairing(cfg.alp_weight,
              cfg.clean_weight, ls), "trades": lambda: Trades(cfg.trades_beta, ls), "mart": lambda: Mart(cfg.mart_lambda),
              "free": lambda: Free(cfg.free_replays, ls)}
    if cfg.name in simple:
        return simple[cfg.name]()
    if cfg.name == "advprop_fg":
        if augment is None:
            raise ValueError("objective advprop_fg needs the AutoAugment transform (data.autoaugment)")
        return FineGrainedAdvProp(augment, cfg.label_smoothing)
    if cfg.name == "madry":
        return Madry(cfg.label_smoothing)
    if cfg.name == "mixed":
        return Mixed(cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "mbn":
        return SplitBN(cfg.clean_weight, 1 - cfg.clean_weight, cfg.label_smoothing)
    if cfg.name == "advprop":
        return SplitBN(1.0, 1.0, cfg.label_smoothing)
    return Clean(cfg.label_smoothing)
