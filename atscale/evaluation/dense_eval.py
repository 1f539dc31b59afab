"""Evaluation of dense models under DAG (Xie thesis Sec 2.3.3-2.3.5, 2.4): the clean metric (mIoU for segmentation,
mAP at IoU 0.5 for detection), DAG over a val split with its diagnostics (active targets per iteration, iterations to
converge, perceptibility p), the PERM control (r with rows and columns permuted, averaged over draws), and any
perturbation field r evaluated on any model (the transfer experiments of Sec 2.4: r_A from one model added to the
images another model sees, or r_A + r_B combined). One code path scores every row: :func:`score_perturbed`.

Targets (Sec 2.3.1-2.3.2): segmentation, every pixel with a ground-truth class other than background (and VOC's 255);
detection, the dense RPN proposals (NMS 0.9) of the clean image that overlap a ground-truth box (IoU > 0.1) and score
> 0.1 for its class. An image with no target is a counted skip: r = 0 there, and it still counts in every metric.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from atscale.attacks.dag import DAG, DAGResult, TargetLogits, perceptibility, permuted, segmentation_logits
from atscale.config.dense import DagCfg
from atscale.data.dense import dense_loader
from atscale.evaluation.dense_metrics import DetectionMAP, MeanIoU
from atscale.models.dense import detection_targets, pad_labels, padded_logits, segmentation_targets


def _metric(task: str, num_classes: int) -> MeanIoU | DetectionMAP:
    return MeanIoU(num_classes) if task == "segmentation" else DetectionMAP()


@torch.no_grad()
def _update(metric: MeanIoU | DetectionMAP, model: nn.Module, x: torch.Tensor, batch: dict) -> None:
    if isinstance(metric, MeanIoU):
        metric.update(model(x).argmax(1).cpu(), batch["mask"])
        return
    preds = [{k: v.cpu() for k, v in p.items()} for p in model(x)]
    keys = ("boxes", "labels", "ignore_boxes", "ignore_labels")
    metric.update(preds, [dict(zip(keys, row)) for row in zip(*(batch[k] for k in keys))])


def score_perturbed(model: nn.Module, dataset: Dataset, task: str, device: torch.device, r: torch.Tensor | None = None,
                    batch_size: int = 16, limit: int = 0) -> dict[str, Any]:
    """The task metric of ``model`` on the first ``limit`` (0 = all) images of ``dataset``, each shifted by its row of
    ``r`` (None = clean) and clipped to [0, 1]; with ``r``, ``limit`` defaults to its rows."""
    if r is not None:
        if limit > r.shape[0]:
            raise ValueError(f"limit {limit} exceeds the {r.shape[0]} perturbations given")
        limit = limit or r.shape[0]
    model.eval()
    metric = _metric(task, model.num_classes)
    seen = 0
    for batch in dense_loader(dataset, batch_size, shuffle=False, seed=0):
        if limit and seen >= limit:
            break
        x = batch["image"]
        keep = x.shape[0] if not limit else min(x.shape[0], limit - seen)
        batch = _head(batch, keep)
        x = batch["image"]
        if r is not None:
            x = (x + r[seen:seen + keep].to(x.dtype)).clamp(0, 1)
        _update(metric, model, x.to(device), batch)
        seen += keep
    return metric.compute()


def clean_metrics(model: nn.Module, dataset: Dataset, task: str, batch_size: int, device: torch.device) -> dict:
    return score_perturbed(model, dataset, task, device, None, batch_size)


def _head(batch: dict, k: int) -> dict:
    return {key: v[:k] for key, v in batch.items()}


def dag_targets(model: nn.Module, x: torch.Tensor, batch: dict, task: str, cfg: DagCfg
                ) -> tuple[TargetLogits, torch.Tensor, torch.Tensor]:
    """(logits_fn, labels (N, T), valid (N, T)) of one batch for :class:`atscale.attacks.dag.DAG`."""
    if task == "segmentation":
        labels, valid = segmentation_targets(batch["mask"].to(x.device))
        return segmentation_logits(model), labels, valid
    gt = [{"boxes": b.to(x.device), "labels": lb.to(x.device)} for b, lb in zip(batch["boxes"], batch["labels"])]
    boxes, labels = detection_targets(model, x, gt, nms_thresh=cfg.nms, top_n=cfg.proposals, iou_min=cfg.iou_min,
                                      score_min=cfg.score_min)
    fn, valid = padded_logits(model, boxes)
    return fn, pad_labels(labels, valid.shape[1]).to(x.device), valid


@dataclass
class DagOutcome:
    """DAG over a split: ``r`` (N, 3, H, W) per image (0 where skipped), per-image iterations, targets, p, whether
    every target flipped, the active-target curve summed over images, and the skip count."""

    r: torch.Tensor
    iters: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    active_curve: list[int] = field(default_factory=list)
    skipped_no_target: int = 0
    seconds: float = 0.0


def run_dag(model: nn.Module, dataset: Dataset, task: str, cfg: DagCfg, device: torch.device, limit: int = 0,
            progress: bool = True) -> DagOutcome:
    """DAG (Algorithm 1) on the first ``limit`` (0 = all) images, batch by batch, with a progress bar. ``r`` comes back
    in half precision on the CPU (what ``perturbations.pt`` keeps and every score uses)."""
    with _attack_mode(model):
        return _run_dag(model, dataset, task, cfg, device, limit, progress)


@contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen weights while attacking; the model's modes and flags are restored afterwards."""
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _run_dag(model: nn.Module, dataset: Dataset, task: str, cfg: DagCfg, device: torch.device, limit: int,
             progress: bool) -> DagOutcome:
    n = min(len(dataset), limit) if limit else len(dataset)
    rs, out, t0 = [], DagOutcome(torch.empty(0)), time.time()
    attack = DAG(cfg.gamma_fraction, cfg.iters_for(task), cfg.seed)
    bar = _bar(progress, n)
    seen = 0
    for batch in dense_loader(dataset, cfg.batch_size, shuffle=False, seed=0):
        if seen >= n:
            break
        batch = _head(batch, min(batch["image"].shape[0], n - seen))
        x = batch["image"].to(device)
        fn, labels, valid = dag_targets(model, x, batch, task, cfg)
        has = valid.any(1)
        out.skipped_no_target += int((~has).sum())
        r = torch.zeros_like(x)
        if bool(has.any()):  # an image without targets is done at m = 0 and never enters the batch
            res = attack.perturb(fn, x, labels, valid, progress=_tick(bar),
                                 indices=list(range(seen, seen + x.shape[0])))
            r = res.r
            _record(out, res, valid, has)
        rs.append(r.half().cpu())  # half: a split's r of VOC size stays within memory
        seen += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
            bar.set_postfix(img_s=f"{seen / (time.time() - t0):.2f}")
    if bar is not None:
        bar.close()
    out.r, out.seconds = torch.cat(rs), time.time() - t0
    return out


def _tick(bar) -> Callable[[int, int], None]:
    def tick(m: int, active: int) -> None:
        if bar is not None and m % 10 == 0:
            bar.set_postfix_str(f"iter {m} active {active}")
    return tick


def _record(out: DagOutcome, res: DAGResult, valid: torch.Tensor, attacked: torch.Tensor) -> None:
    """Adds the batch's ``attacked`` images (bool (N,): those with targets) to the split's diagnostics."""
    out.iters += res.iters[attacked].tolist()
    out.targets += valid.sum(1)[attacked].tolist()
    out.p += perceptibility(res.r)[attacked].tolist()
    out.converged += res.converged[attacked].tolist()
    for m, per_image in enumerate(res.active):
        if m >= len(out.active_curve):
            out.active_curve.append(0)
        out.active_curve[m] += sum(per_image)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="DAG", unit="img", leave=False)


def perm_scores(model: nn.Module, dataset: Dataset, task: str, r: torch.Tensor, draws: int, seed: int,
                device: torch.device, batch_size: int = 16) -> list[dict]:
    """The PERM control (Sec 2.3.5): the metric under ``draws`` independent row/column permutations of ``r``."""
    g = torch.Generator().manual_seed(seed)
    return [score_perturbed(model, dataset, task, device, permuted(r, g), batch_size, limit=r.shape[0])
            for _ in range(draws)]


__all__ = ["DagOutcome", "clean_metrics", "dag_targets", "perm_scores", "run_dag", "score_perturbed"]
