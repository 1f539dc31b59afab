"""Loops only (DESIGN.md convention 4): the training step that ``atscale train`` and the benchmarks run, and one epoch
of such steps over a :class:`atscale.training.run.Run`.

Per micro-batch (Xie thesis Sec 4.5, 6.3; the robust ImageNet recipe of ARES 2.0 robust_training, Liu et al. 2023):

1. x = AutoAugment(x) or RandAugment(x) (Cubuk et al. 2019, 2020) when on (``run.loop_augment``);
2. Mixup / CutMix (Zhang et al. 2018; Yun et al. 2019) when ``data.mixup`` is on (``run.mixing``): x becomes the
   mixed images and y splits into three labels (``atscale.training.mixing``): ``soft``, the [B, C] mixed targets with
   ``objective.label_smoothing`` applied there, once; ``hard`` = argmax(soft); and the attack's labels, ``soft`` or
   ``hard`` by ``attack.mixup_labels``;
3. x_adv = ``objective.make_adv`` with the attack's labels (the attack on the unwrapped module: eval-mode BN, no
   parameter gradients, so no gradient synchronization fires);
4. the objective's loss against ``soft`` (the plain labels without mixing; the objectives add no second smoothing to
   soft targets) through the update module and ``updater.backward``; step accuracies are against ``hard``.

Every ``dist.grad_accum`` micro-batches make one optimizer step with one gradient all-reduce. A non-finite loss stops
the run (``TrainingDiverged``) before anything is saved.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from atscale.runtime import autocast
from atscale.training.guards import DivergenceGuard

if TYPE_CHECKING:
    from atscale.training.run import Run

@dataclass
class Meter:
    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, n: int, **values: float) -> None:
        self.n += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def averages(self) -> dict[str, float]:
        return {k: v / max(1, self.n) for k, v in self.sums.items()}


def freeze_bn_statistics(module: nn.Module) -> int:
    """Put every BatchNorm (plain, synchronized, timm's BN+act, Mixture BN) in eval mode: normalize with the running
    statistics and stop updating them, while affine parameters still train (Xie thesis Sec 6.4.3). Returns the count."""
    from atscale.layers.mixture_bn import MixtureBatchNorm2d

    n = 0
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, MixtureBatchNorm2d)):
            m.eval()
            n += 1
    return n


def train_step(updater, attack, objective, x: torch.Tensor, y: torch.Tensor, *, amp_dtype: torch.dtype | None,
               last_micro: bool = True, attack_y: torch.Tensor | None = None):
    """One micro-batch of adversarial training; the optimizer steps when ``last_micro``. ``y``: the loss's labels
    (class indices or Mixup soft targets); ``attack_y``: the attack's labels (None = ``y``). Returns the objective's
    output (``loss``, ``logits``, ``clean_logits``)."""
    ya = y if attack_y is None else attack_y
    x_adv = objective.make_adv(updater.model, attack, x, ya) if objective.needs_attack else x
    with updater.micro_batch(last_micro):
        with autocast(x.device, amp_dtype):
            out = objective(updater.module, x, x_adv, y)
        updater.backward(out.loss, last_micro)
    objective.after_backward()
    return out


def step_metrics(out: Any, y: torch.Tensor) -> dict[str, float]:
    """Loss and accuracies of one step; ``y``: class indices (under Mixup / CutMix each image's dominant label)."""
    m = {"loss": out.loss.item(), "acc": (out.logits.argmax(1) == y).float().mean().item()}
    if out.clean_logits is not None:
        m["clean_acc"] = (out.clean_logits.argmax(1) == y).float().mean().item()
    return m


def prepare_batch(run: "Run", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]:
    """Steps 1-2 of the module docstring: (images, the loss's labels, the attack's labels, the hard labels)."""
    if run.loop_augment is not None:
        x = run.loop_augment(x)
    if run.mixing is None:
        return x, y, y, y
    mixed = run.mixing(x, y)
    return mixed.x, mixed.soft, mixed.attack, mixed.hard


@dataclass
class EpochResult:
    averages: dict[str, float]
    seconds: float
    images: int
    stopped: str = ""  # why the epoch ended early: max_steps | preempted | "" (it ran to its end)
    bn_eval: bool = False  # BN used its running statistics (the last schedule.bn_eval_last_epochs)

    @property
    def img_per_s(self) -> float:
        return self.images / max(1e-9, self.seconds)


def train_epoch(run: "Run", after_step) -> EpochResult:
    """The rest of ``run``'s current epoch from micro-batch ``run.batch``. ``after_step(metrics, plan, end_of_epoch)``
    runs after every optimizer step (logging, EMA, stop requests, checkpoints) and returns a reason to stop, or ''."""
    loader = run.train_loader()
    loader.set_epoch(run.epoch)
    module, accum, replays = run.updater.module, run.accum, run.objective.replays
    usable, spe = run.micro_batches(loader), run.steps_per_epoch(loader)
    module.train()
    bn_eval = run.epoch >= run.cfg.schedule.epochs - run.cfg.schedule.bn_eval_last_epochs
    if bn_eval:
        freeze_bn_statistics(module)
    meter, guard = Meter(), DivergenceGuard(run.amp_dtype)
    k = run.batch // accum * replays  # optimizer steps of this epoch already done (resume)
    skip, t0, seen, stopped = run.batch, time.perf_counter(), 0, ""
    base_seconds, base_images = run.train_seconds, run.train_images
    bar = tqdm(total=usable, initial=skip, desc=f"epoch {run.epoch + 1}/{run.cfg.schedule.epochs}", unit="batch",
               disable=not (run.cfg.log.progress and run.main), dynamic_ncols=True, mininterval=1.0, leave=False)
    for i, (x, y) in enumerate(loader):
        if i < skip:
            continue
        if i >= usable or stopped:
            break
        bar.update(1)
        last = (i + 1) % accum == 0
        x, y_loss, y_attack, y = prepare_batch(run, x, y)
        for _ in range(replays):
            plan = run.plan(k, spe)
            run.apply(plan)
            out = train_step(run.updater, run.attack, run.objective, x, y_loss, amp_dtype=run.amp_dtype,
                             last_micro=last, attack_y=y_attack)
            seen += y.shape[0]
            if not last:
                continue
            run.step, run.batch, k = run.step + 1, i + 1, k + 1
            m = step_metrics(out, y)
            guard.check(m["loss"], run.step, i + 1)
            meter.add(y.shape[0], **m)
            elapsed = time.perf_counter() - t0
            run.train_seconds, run.train_images = base_seconds + elapsed, base_images + seen
            m.update(lr=plan.lr, img_per_s=seen / max(1e-9, elapsed))
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}", img_s=f"{m['img_per_s']:.0f}",
                            lr=f"{plan.lr:.3g}")
            stopped = after_step(m, plan, i + 1 == usable)
            if stopped:
                break
    bar.close()
    if not stopped:
        run.batch = usable
    return EpochResult(meter.averages(), time.perf_counter() - t0, seen, stopped, bn_eval)


__all__ = ["train_step", "train_epoch", "prepare_batch", "step_metrics", "EpochResult", "Meter", "freeze_bn_statistics"]
