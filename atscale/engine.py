"""Loops only: one training epoch with the attack inside the step, and evaluation under a set of attacks.

Both return plain dicts of averages over the images they saw. Wiring (data, model, logging, checkpoints) is train.py's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from atscale import distributed as dist
from atscale.attacks.pgd import PGD
from atscale.layers.context import evaluation


class TrainingDiverged(RuntimeError):
    """The training loss or the weights stopped being finite: the run stops before saving them."""


_DIVERGED_FIX = ("Lower optim.lr, lengthen schedule.warmup_epochs or attack.warmup_epochs, lower attack.step, or "
                 "train in bf16 (run.amp) rather than fp16, then start again or resume from the last checkpoint")


def nonfinite_state(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers (BN running statistics too) holding a NaN or inf; one device sync when all
    are finite."""
    tensors = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point() and t.numel()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return []
    return [n for n, t in tensors if not bool(torch.isfinite(t).all())]


def refuse_nonfinite_state(module: nn.Module, step: int) -> None:
    """The guard in front of a checkpoint write: raise ``TrainingDiverged`` rather than save NaN/inf weights or BN
    statistics, so the last good checkpoint stays the newest."""
    bad = nonfinite_state(module)
    if bad:
        raise TrainingDiverged(f"training diverged: {len(bad)} weight or BN-statistics tensors hold NaN or inf at step "
                               f"{step} (first: {bad[0]}); not saving them. {_DIVERGED_FIX}")


# fp16 runs use dynamic loss scaling, which skips a step whose loss or gradients overflow and lowers the scale; a few
# such steps in a row are normal there. Without it, the first non-finite loss has already reached the weights.
FP16_NONFINITE_STEPS = 20


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


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _bar(iterable: Iterable, total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit="batch", dynamic_ncols=True,
                initial=initial, mininterval=1.0, leave=False)


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


def train_one_epoch(updater, loader, attack, objective, *, lr_at: Callable[[int], float], first_step: int,
                    skip_batches: int = 0, amp_dtype: torch.dtype | None = None,
                    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    after_step: Callable[[int, dict], bool] | None = None, progress: bool = True,
                    desc: str = "train", bn_eval: bool = False) -> dict:
    """Run the rest of one epoch from (micro-)batch ``skip_batches``; ``after_step(step, metrics)`` returning True stops.

    ``updater`` (atscale.updater: DDP or DeepSpeed) holds the model and optimizer. Per micro-batch:
    x = augment(x) when given (AutoAugment), then ``objective.make_adv`` (the attack on the unwrapped module: eval-mode
    BN, no parameter grads, so no gradient synchronization fires), then the objective through ``updater.module`` and
    ``updater.backward``; every ``updater.accum`` micro-batches make one optimizer step with one gradient
    all-reduce. ``objective.replays`` > 1 (free training) repeats the micro-batch as that many optimizer steps.
    ``bn_eval``: BN layers normalize with (and keep) their running statistics, the train/test-consistent BN of the
    last epochs (Xie thesis Sec 6.4.3).
    """
    module, accum = updater.module, updater.accum
    module.train()
    if bn_eval:
        freeze_bn_statistics(module)
    meter = Meter()
    step = first_step
    t0, seen = time.perf_counter(), 0
    usable = len(loader) - len(loader) % accum
    bar = _bar(loader, usable, desc, progress, initial=skip_batches)
    stopped = False
    nonfinite, tolerated = 0, FP16_NONFINITE_STEPS if amp_dtype == torch.float16 else 0
    device = next(updater.model.parameters()).device
    for i, (x, y) in enumerate(bar):
        if i < skip_batches:
            continue
        if i >= usable:
            break
        last_micro = (i + 1) % accum == 0
        if augment is not None:
            x = augment(x)
        for _ in range(objective.replays):
            lr = lr_at(step)
            x_adv = objective.make_adv(updater.model, attack, x, y) if objective.needs_attack else x
            with updater.micro_batch(last_micro):
                with autocast(device, amp_dtype):
                    out = objective(module, x, x_adv, y)
                updater.backward(out.loss, last_micro)
            objective.after_backward()
            n = y.shape[0]
            seen += n
            if not last_micro:
                continue
            step += 1
            m = {"loss": out.loss.item(), "acc": (out.logits.argmax(1) == y).float().mean().item()}
            nonfinite = 0 if math.isfinite(m["loss"]) else nonfinite + 1
            if nonfinite > tolerated:
                raise TrainingDiverged(
                    f"training diverged: loss {m['loss']} at step {step} (batch {i + 1} of the epoch"
                    f"{f', {nonfinite} non-finite steps in a row' if tolerated else ''}); nothing after the last "
                    f"checkpoint was saved. {_DIVERGED_FIX}")
            if out.clean_logits is not None:
                m["clean_acc"] = (out.clean_logits.argmax(1) == y).float().mean().item()
            meter.add(n, **m)
            ips = seen / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}", img_s=f"{ips:.0f}", lr=f"{lr:.3g}")
            if after_step is not None and after_step(step, {**m, "lr": lr, "img_per_s": ips, "batch": i + 1}):
                stopped = True
                break
        if stopped:
            break
    bar.close()
    avg = meter.averages()
    avg.update(img_per_s=seen / max(1e-9, time.perf_counter() - t0), steps=step - first_step, stopped=stopped)
    return avg


def rank_share(max_images: int) -> int | None:
    """This rank's part of the first ``max_images`` images of the val set sharded ``rank::world`` (None: all)."""
    return len(range(dist.rank(), max_images, dist.world_size())) if max_images else None


def first_images(batches: Iterable, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches, the last one cut, until ``limit`` images have come out (None: all of them)."""
    seen = 0
    for x, y in batches:
        if limit is not None:
            if seen >= limit:
                return
            x, y = x[: limit - seen], y[: limit - seen]
        seen += y.shape[0]
        yield x, y


def evaluate(model: nn.Module, loader, attacks: dict[str, PGD] | None = None, *, amp_dtype: torch.dtype | None = None,
             max_images: int = 0, progress: bool = True, desc: str = "eval") -> dict[str, dict]:
    """Clean accuracy and per-attack accuracy over the loader, inside ``atscale.layers.context.evaluation()``."""
    with evaluation(), torch.no_grad():
        return _evaluate(model, loader, attacks, amp_dtype=amp_dtype, max_images=max_images, progress=progress,
                         desc=desc)


def _evaluate(model: nn.Module, loader, attacks: dict[str, PGD] | None, *, amp_dtype: torch.dtype | None,
              max_images: int, progress: bool, desc: str) -> dict[str, dict]:
    """Clean accuracy and, per attack, accuracy and attack success rate over the loader (each image once).

    Distributed: each rank holds the strided shard ``rank::world`` of the val set and counts are summed over ranks, so
    every image counts exactly once; ``max_images`` keeps the first max_images images of the whole set.
    Success rate: targeted = fraction of images classified as their target; untargeted = fraction of the images that
    were classified correctly when clean and are misclassified after the attack.
    """
    limit = rank_share(max_images)
    attacks = attacks or {}
    for a in attacks.values():
        a.reseed(a.seed)  # same starts and targets for every attack: PGD-j's iterates are a prefix of PGD-k's
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = 0
    clean_correct = 0
    stats = {k: {"correct": 0, "success": 0, "clean_correct_fooled": 0} for k in attacks}
    t0 = time.perf_counter()
    total = len(loader)
    bar = _bar(loader, total, desc, progress)
    for x, y in first_images(bar, limit):
        with autocast(device, amp_dtype):
            clean_ok = model(x).argmax(1) == y
        clean_correct += int(clean_ok.sum())
        for name, atk in attacks.items():
            with torch.enable_grad():
                res = atk.perturb(model, x, y)
            with autocast(device, amp_dtype):
                pred = model(res.x_adv).argmax(1)
            ok = pred == y
            s = stats[name]
            s["correct"] += int(ok.sum())
            s["clean_correct_fooled"] += int((clean_ok & ~ok).sum())
            if res.target is not None:
                s["success"] += int((pred == res.target).sum())
        n += y.shape[0]
        bar.set_postfix(clean=f"{clean_correct / n:.3f}", img_s=f"{n / (time.perf_counter() - t0):.1f}")
    bar.close()
    model.train(was_training)
    counts = [n, clean_correct] + [stats[k][f] for k in attacks for f in ("correct", "success", "clean_correct_fooled")]
    totals = dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    n, clean_correct = int(totals[0]), int(totals[1])
    for j, k in enumerate(attacks):
        stats[k] = dict(zip(("correct", "success", "clean_correct_fooled"), map(int, totals[2 + 3 * j: 5 + 3 * j])))
    out = {"clean": {"acc": clean_correct / max(1, n), "n": n}}
    for name, atk in attacks.items():
        s = stats[name]
        rate = s["success"] / max(1, n) if atk.targeted else s["clean_correct_fooled"] / max(1, clean_correct)
        out[name] = {"acc": s["correct"] / max(1, n), "success_rate": rate, "n": n, "steps": atk.iters,
                     "eps": atk.eps * 255.0, "step": atk.step * 255.0, "targeted": atk.targeted}
    out["clean"]["seconds"] = time.perf_counter() - t0
    return out
