"""Training of the dense models DAG attacks (issue 15; Xie thesis Sec 2.3.3 trains FCN and Faster R-CNN on Pascal VOC;
atscale's short recipe trains torchvision's models on the embedded scenes or VOC).

One loop for both tasks: segmentation minimizes the per-pixel cross-entropy (VOC's 255 pixels ignored), detection the
sum of torchvision Faster R-CNN's four losses. SGD with momentum (or AdamW), linear warmup then cosine, per step;
gradient clipping; DDP when launched with torchrun or srun (each rank a shard of the scenes). The checkpoint is
written atomically at every epoch end with the optimizer, schedule position and RNG, so a resumed run ends where an
unbroken one would. Progress bar with images/s, ``log.jsonl`` and TensorBoard.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atscale import distributed as dist
from atscale.checkpoint import CheckpointDir, load_checkpoint
from atscale.config.dense import DagCfg, DenseConfig, dense_from_dict, save_dense_config
from atscale.data.dense import collate_dense, dense_datasets, dense_loader
from atscale.errors import CheckpointError, ConfigError, TrainingDiverged
from atscale.fsio import atomic_write_bytes
from atscale.models.dense import build_dense_model
from atscale.reporting.runlog import RunLog

CONFIG_NAME = "dense_config.yaml"


def dense_model(cfg: DenseConfig, data_classes: int, device: torch.device, weights: str | None = None) -> nn.Module:
    """The config's model for a dataset of ``data_classes`` classes (``model.num_classes`` 0 takes the dataset's; a
    model with fewer classes than the data's labels is refused)."""
    n = cfg.model.num_classes or data_classes
    if n < data_classes:
        raise ConfigError(f"model.num_classes = {n} but the {cfg.data.source} data has {data_classes} classes "
                          "(background included)", f"set model.num_classes={data_classes} or 0 (the dataset's)")
    return build_dense_model(cfg.model.arch, n, cfg.data.image_size,
                             weights=cfg.model.weights if weights is None else weights,
                             **cfg.model.options).to(device)


def dense_loss(model: nn.Module, task: str, batch: dict, device: torch.device) -> torch.Tensor:
    x = batch["image"].to(device)
    if task == "segmentation":
        return F.cross_entropy(model(x), batch["mask"].to(device), ignore_index=255)
    targets = [{"boxes": b.to(device), "labels": lb.to(device)} for b, lb in zip(batch["boxes"], batch["labels"])]
    return sum(model(x, targets).values())


def flip_batch(batch: dict, g: torch.Generator) -> dict:
    """Horizontal flips, one coin per image, applied to the image, mask and boxes alike."""
    flip = torch.rand(batch["image"].shape[0], generator=g) < 0.5
    w = batch["image"].shape[-1]
    image, mask = batch["image"].clone(), batch["mask"].clone()
    image[flip], mask[flip] = image[flip].flip(-1), mask[flip].flip(-1)
    out = {**batch, "image": image, "mask": mask}
    for key in ("boxes", "ignore_boxes"):
        boxes = list(batch[key])
        for i in torch.nonzero(flip).flatten().tolist():
            b = boxes[i].clone()
            b[:, [0, 2]] = w - boxes[i][:, [2, 0]]
            boxes[i] = b
        out[key] = boxes
    return out


def lr_at(cfg: DenseConfig, step: int, total: int, per_epoch: int) -> float:
    warm = int(cfg.optim.warmup_epochs * per_epoch)
    if step < warm:
        return cfg.optim.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(cfg: DenseConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class DenseTrainer:
    """Owns one dense run: model (DDP-wrapped when distributed), optimizer, loader, position, checkpoint folder."""

    def __init__(self, cfg: DenseConfig, device: torch.device):
        self.cfg, self.device, self.task = cfg, device, cfg.task
        self.train_set, self.val_set = dense_datasets(cfg.data, cfg.task)
        self.num_classes = cfg.model.num_classes or self.train_set.num_classes
        torch.manual_seed(cfg.run.seed)
        self.model = dense_model(cfg, self.train_set.num_classes, device)
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if dist.is_dist() else self.model
        self.opt = _optimizer(cfg, self.model)
        self.loader = dense_loader(self.train_set, cfg.data.batch_size, shuffle=True, seed=cfg.run.seed,
                                   num_workers=cfg.data.num_workers, distributed=dist.is_dist())
        self.per_epoch = len(self.loader)
        self.total = self.per_epoch * cfg.optim.epochs
        self.epoch, self.step = 0, 0
        self.flip_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.ckpt = CheckpointDir(cfg.run_dir / "checkpoints", cfg.run.keep_last)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "dense", "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step,
                "flip_gen": self.flip_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "num_classes": self.num_classes}

    def resume(self) -> bool:
        if not self.ckpt.last.is_file():
            return False
        state = load_checkpoint(self.ckpt.last)
        if state.get("kind") != "dense":
            raise CheckpointError(f"{self.ckpt.last} is not a dense checkpoint", "use another run.name")
        changed = _changed(state["config"], self.cfg.to_dict())
        if changed:
            raise CheckpointError(f"run folder {self.cfg.run_dir} holds a run with other settings ({', '.join(changed)})"
                                  ": resuming would change its data or schedule mid-run",
                                  "use another run.name, or delete that run folder to start over")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.flip_gen.set_state(state["flip_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    def train_epoch(self, log: RunLog | None) -> dict[str, float]:
        self.ddp.train()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if hasattr(self.loader, "generator") and self.loader.generator is not None:
            self.loader.generator.manual_seed(self.cfg.run.seed * 1000 + self.epoch)
        bar = _bar(self.cfg, self.per_epoch, f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}")
        total_loss, seen, t0 = 0.0, 0, time.time()
        for batch in self.loader:
            if self.cfg.data.flip:
                batch = flip_batch(batch, self.flip_gen)
            loss = self._update(batch)
            n = batch["image"].shape[0]
            total_loss, seen = total_loss + loss * n, seen + n
            if log is not None and self.step % 10 == 0:
                log.write("train", self.step, loss=loss, lr=self.opt.param_groups[0]["lr"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen * dist.world_size() / (time.time() - t0):.0f}")
        if bar is not None:
            bar.close()
        self.epoch += 1
        return {"loss": total_loss / max(1, seen), "img_per_s": seen * dist.world_size() / (time.time() - t0)}

    def _update(self, batch: dict) -> float:
        for grp in self.opt.param_groups:
            grp["lr"] = lr_at(self.cfg, self.step, self.total, self.per_epoch)
        loss = dense_loss(self.ddp, self.task, batch, self.device)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the {self.task} loss is {loss.item()} at step {self.step}",
                                   "lower optim.lr or keep optim.grad_clip > 0")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.step += 1
        return float(loss.detach())


_FREE_KEYS = {"data.num_workers", "data.eval_batch_size", "run.progress", "run.tensorboard", "run.device",
              "run.keep_last", "run.out_dir", "run.name"} | {f"dag.{k}" for k in DagCfg.__dataclass_fields__}


def _changed(saved: dict, now: dict) -> list[str]:
    """The settings of a resumed run that differ from its checkpoint's, other than those that do not change training."""
    out = []
    for section, values in now.items():
        for k, v in values.items():
            key = f"{section}.{k}"
            if key not in _FREE_KEYS and saved.get(section, {}).get(k) != v:
                out.append(f"{key}: {saved.get(section, {}).get(k)!r} -> {v!r}")
    return out


def _bar(cfg: DenseConfig, total: int, desc: str):
    if not cfg.run.progress or dist.rank() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def train_dense(cfg: DenseConfig) -> dict[str, Any]:
    """Train (or resume) one dense run in ``run.out_dir/run.name``; returns the summary written to ``summary.json``
    (clean mIoU or mAP@0.5 on the val split)."""
    from atscale.distributed.env import DistEnv, init
    from atscale.evaluation.dense_eval import clean_metrics

    device = init(DistEnv.from_env(), cfg.run.device)
    main = dist.rank() == 0
    run_dir = cfg.run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_dense_config(cfg, run_dir / CONFIG_NAME)
    tr = DenseTrainer(cfg, device)
    resumed = tr.resume()
    log = RunLog(run_dir, cfg.run.tensorboard) if main else None
    t_start = time.time()
    try:
        while tr.epoch < cfg.optim.epochs:
            m = tr.train_epoch(log)
            if main:
                log.write("epoch", tr.step, epoch=tr.epoch, **m)
                tr.ckpt.save(tr.state_dict(), tr.step)
            dist.barrier()
        summary = {"task": tr.task, "arch": cfg.model.arch, "resumed": resumed, "epochs": tr.epoch,
                   "train_s": time.time() - t_start}
        if main:
            summary.update(clean_metrics(tr.model, tr.val_set, tr.task, cfg.data.eval_batch_size, device))
            atomic_write_bytes(run_dir / "summary.json", _json(summary))
            print(f"{cfg.model.arch}: {_headline(summary)} on {len(tr.val_set)} val images; run folder {run_dir}")
    finally:
        if log is not None:
            log.close()
    return summary


def _headline(s: dict) -> str:
    return f"mIoU {100 * s['miou']:.1f}%" if "miou" in s else f"mAP@0.5 {100 * s['map50']:.1f}%"


def _json(obj: Any) -> bytes:
    import json

    return (json.dumps(obj, indent=1) + "\n").encode()


def load_dense_run(run_dir: str | Path, device: torch.device) -> tuple[DenseConfig, nn.Module]:
    """The config and trained model (eval mode) of a dense run folder."""
    run_dir = Path(run_dir)
    last = CheckpointDir(run_dir / "checkpoints").last
    if not last.is_file():
        raise CheckpointError(f"no dense checkpoint at {last}", "train first: atscale dense train --config ...")
    state = load_checkpoint(last, map_location="cpu")
    if state.get("kind") != "dense":
        raise CheckpointError(f"{last} is a classification checkpoint, not a dense one",
                              "pass the run folder of `atscale dense train`")
    cfg = dense_from_dict(state["config"])
    model = dense_model(cfg, state["num_classes"], device, weights="")
    model.load_state_dict(state["model"])
    return cfg, model.eval()


__all__ = ["DenseTrainer", "train_dense", "load_dense_run", "dense_loss", "flip_batch", "lr_at", "collate_dense"]
