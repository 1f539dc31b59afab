"""Pre-processor objectives with discriminators: APE-G (Jin et al. 2019, APE-GAN) and ARN (Zhou et al. 2021,
``zhou-2021-attack-invariant-features-arn``), both on static adversarial examples of the target T (the JATP paper's
baselines are trained this way, Sec 4). The pre-processor P is the defended model's (``defense.preprocessor``: ape_g
or arn) and the run's optimizer updates it; the discriminators are the objective's own networks with their own Adam
optimizer (``objective.disc_lr``), updated after every backward of P's loss (Algorithm 1, step 5), their gradients
averaged over ranks, and carried in checkpoints by ``state_dict``. P's loss is one forward pass of the (DDP) training
module, with P's outputs read through forward hooks.

- **APE-G**: L_G = 0.7 * MSE(G(x*), x) + 0.3 * BCE(D(G(x*)), real) and L_D = BCE(D(x), real) + BCE(D(G(x*)), fake)
  (APE-GAN, Eq. 2-4, its weights 0.7 / 0.3).
- **ARN**: K seen attacks (``objective.arn_attacks``) give K static batches x~_k. L_E = L_mse + l1 L_att + l2 L_nor
  (Eq. 7), L_G = L_mse + theta L_adv (Eq. 8); L_D_A (Eq. 1) and L_D_I (Eq. 5) for the discriminators. L_mse is the
  per-image squared error summed over pixels, averaged over images and attacks (Eq. 4 up to the batch mean); L_att is
  the cross-entropy of D_A's prediction to the uniform label (Eq. 2); L_nor = mean_k KL(P_k || N(0, I)) (Eq. 3) with
  P_k the Gaussian of the batch's code statistics of attack k (per-channel mean and variance; the closed-form KL of a
  diagonal Gaussian); L_adv = -log D_I(G(E(x~))) (Eq. 6). So that L_adv reaches G only (Eq. 8), its gradient with
  respect to the code is computed first (``autograd.grad``, which touches no parameter) and a hook on the code takes
  it off what flows into E; L_att / L_nor reach E only, as D_A is frozen during P's backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atscale import distributed as dist
from atscale.attacks import OWN_NORM, make_attack
from atscale.config.units import budget_fraction, to_fraction
from atscale.layers.taps import tap
from atscale.models.preprocessors import APEDiscriminator, AttackDiscriminator, ImageDiscriminator
from atscale.training.objective_base import Objective, StepOutput, unwrapped

__all__ = ["APEGObjective", "ARNObjective", "Discriminators", "gaussian_kl_to_standard"]


def gaussian_kl_to_standard(z: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(var)) || N(0, I)) per dimension, averaged over the channels of ``z`` [B, C, ...], with mu / var the
    batch statistics of each channel (over images and positions)."""
    flat = z.transpose(0, 1).flatten(1).float()
    mu, var = flat.mean(1), flat.var(1, unbiased=False).clamp_min(1e-8)
    return 0.5 * (var + mu.square() - 1.0 - var.log()).mean()


class Discriminators:
    """Named discriminator networks, one Adam optimizer (``lr``, betas 0.5 / 0.999 as GAN training uses), gradients
    averaged over ranks; frozen except inside :meth:`step`."""

    def __init__(self, nets: dict[str, nn.Module], lr: float, device: torch.device) -> None:
        self.nets = nn.ModuleDict(nets).to(device)
        self.nets.requires_grad_(False)
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=lr, betas=(0.5, 0.999))

    def __getitem__(self, name: str) -> nn.Module:
        return self.nets[name]

    def step(self, loss_fn) -> float:
        self.nets.requires_grad_(True)
        self.nets.train()
        try:
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            if dist.world_size() > 1:
                for p in self.nets.parameters():
                    if p.grad is not None:
                        p.grad.div_(dist.world_size())
                        dist.all_reduce_sum(p.grad)
            self.opt.step()
        finally:
            self.nets.requires_grad_(False)
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.nets.load_state_dict(state["nets"])
            self.opt.load_state_dict(state["opt"])


class _WithDiscriminators(Objective):
    """Shared parts: the discriminators built by ``bind`` on the model's device, the pending discriminator batch,
    the checkpointed state."""

    def __init__(self, disc_lr: float) -> None:
        self.disc_lr = disc_lr
        self.disc: Discriminators | None = None
        self._pending: tuple | None = None

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return attack(model.classifier_view(), x, y)

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict()} if self.disc else {}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(state.get("disc", {}))


class APEGObjective(_WithDiscriminators):
    def __init__(self, disc_lr: float = 1e-4, mse_weight: float = 0.7, adv_weight: float = 0.3) -> None:
        super().__init__(disc_lr)
        self.mse_weight, self.adv_weight = mse_weight, adv_weight

    def bind(self, model: nn.Module) -> None:
        gen = model.preprocessor.body
        w1, w2 = gen[0].out_channels, gen[2].out_channels
        self.disc = Discriminators({"d": APEDiscriminator((w1, w2, 2 * w2))}, self.disc_lr,
                                   next(model.parameters()).device)

    def __call__(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        with tap(unwrapped(module), ["preprocessor"]) as out:
            logits = module(x_adv).float()
        restored = out["preprocessor"].float()
        real = torch.ones(x.shape[0], device=x.device)
        mse = F.mse_loss(restored, x)
        adv = F.binary_cross_entropy_with_logits(self.disc["d"](restored), real)
        self._pending = (x.detach(), restored.detach())
        return StepOutput(self.mse_weight * mse + self.adv_weight * adv, logits)

    def after_backward(self) -> None:
        x, restored = self._pending
        d = self.disc["d"]
        real, fake = torch.ones(x.shape[0], device=x.device), torch.zeros(x.shape[0], device=x.device)
        self.disc.step(lambda: F.binary_cross_entropy_with_logits(d(x), real)
                       + F.binary_cross_entropy_with_logits(d(restored), fake))


class ARNObjective(_WithDiscriminators):
    def __init__(self, attacks: list[dict], lam1: float, lam2: float, theta: float, disc_lr: float = 1e-4,
                 seed: int = 0) -> None:
        super().__init__(disc_lr)
        if not attacks:
            raise ValueError("ARN needs at least one seen attack (objective.arn_attacks)")
        self.lam1, self.lam2, self.theta = lam1, lam2, theta
        self.attacks = [self._seen(a, seed + 1009 * dist.rank() + 7 * i) for i, a in enumerate(attacks)]

    @staticmethod
    def _seen(row: dict, seed: int):
        """One seen attack from its row (Zhou et al. 2021 Sec 4.2: PGD_N + PGD_T, DDN_N + PGD_N, or PGD_N + STA_N):
        budgets in 0..255 units for linf / l2, in their own units for STA (flow pixels) and FWA."""
        norm = row.get("norm") or OWN_NORM.get(row["attack"], "linf")
        return make_attack(row["attack"], eps=budget_fraction(row["eps"], norm), steps=int(row["steps"]), norm=norm,
                           targeted=bool(row.get("targeted", False)), seed=seed,
                           **({"step": to_fraction(row["step"])} if row.get("step") else {}))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "attacks": [a.state_dict() for a in self.attacks]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for a, s in zip(self.attacks, state.get("attacks", [])):
            a.load_state_dict(s)

    def bind(self, model: nn.Module) -> None:
        enc = model.preprocessor.encoder.body
        w1, w2, code = enc[0].out_channels, enc[2].out_channels, enc[5].out_channels
        self.disc = Discriminators({"attack": AttackDiscriminator(code, len(self.attacks), w2),
                                    "image": ImageDiscriminator((w1, w2, 2 * w2))}, self.disc_lr,
                                   next(model.parameters()).device)

    def make_adv(self, model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The K seen attacks' static examples of T, concatenated [K * B] (the run's own training attack unused)."""
        view = model.classifier_view()
        return torch.cat([a(view, x, y) for a in self.attacks])

    def __call__(self, module: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model, k, n = unwrapped(module), len(self.attacks), x.shape[0]
        with tap(model, ["preprocessor.encoder", "preprocessor"]) as out:
            logits = module(x_adv).float()
        code_out = out["preprocessor.encoder"]
        codes, restored = code_out.float(), out["preprocessor"].float()
        target = x.repeat(k, 1, 1, 1)
        l_mse = (restored - target).square().flatten(1).sum(1).mean()
        att_logits = self.disc["attack"](codes)
        l_att = -F.log_softmax(att_logits, 1).mean(1).mean()
        l_nor = torch.stack([gaussian_kl_to_standard(c) for c in codes.split(n)]).mean()
        real = torch.ones(restored.shape[0], device=x.device)
        l_adv = F.binary_cross_entropy_with_logits(self.disc["image"](restored), real)
        if code_out.requires_grad:  # Eq. 7-8: E minimizes L_E, which has no L_adv; take its share off E's gradient
            (g_adv,) = torch.autograd.grad(self.theta * l_adv, code_out, retain_graph=True)
            code_out.register_hook(lambda g: g - g_adv)
        self._pending = (x.detach(), codes.detach(), restored.detach())
        loss = l_mse + self.lam1 * l_att + self.lam2 * l_nor + self.theta * l_adv
        return StepOutput(loss, logits[:n])  # accuracy on the first seen attack's batch

    def after_backward(self) -> None:
        x, codes, restored = self._pending
        n, k = x.shape[0], len(self.attacks)
        kinds = torch.arange(k, device=x.device).repeat_interleave(n)

        def loss() -> torch.Tensor:
            d_a = F.cross_entropy(self.disc["attack"](codes), kinds)
            d_i = self.disc["image"]
            real, fake = torch.ones(n, device=x.device), torch.zeros(restored.shape[0], device=x.device)
            return d_a + F.binary_cross_entropy_with_logits(d_i(x), real) \
                + F.binary_cross_entropy_with_logits(d_i(restored), fake)

        self.disc.step(loss)
