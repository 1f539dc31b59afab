"""The run object: ``build(cfg, env, device) -> Run`` wires every part of one training run (data, model, updater,
attack, objective, EMA, early stopping, checkpoint folder) and owns its persistent state.

``Run.state_dict()`` / ``Run.load_state_dict()`` are the only writer and reader of the training checkpoint format
(weights, optimizer, attack / augmentation / objective generators, early stopping, torch RNG, position, config and
dataset meta); :func:`atscale.checkpoint.model_from_checkpoint` reads its model part for evaluation and export. The
per-step schedules (lr, attack eps and step) are :func:`atscale.training.schedule.plan_at`, a function of the position
that the loop applies explicitly.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atscale import distributed as dist
from atscale.attacks import build_attack
from atscale.checkpoint import (CheckpointDir, init_defense_from, init_from_pretrained, load_checkpoint,
                                load_model_state, save_checkpoint)
from atscale.config import Config, config_from_yaml_text, save_config
from atscale.config.diff import config_changes, describe_changes
from atscale.data import ensure_dataset, make_loader
from atscale.data.augment import AutoAugmentBatch, RandAugmentBatch
from atscale.distributed.updater import build_updater
from atscale.errors import CheckpointError, ConfigError
from atscale.layers.checkpointing import enable_activation_checkpointing
from atscale.layers.context import set_stochastic_attack
from atscale.layers.sync_bn import convert_sync_bn
from atscale.defenses import build_model
from atscale.models.factory import require_batchnorm
from atscale.run_folder import RunFolder
from atscale.runtime import compile_model, resolve_amp, set_backend_flags
from atscale.training.controls import (EarlyStopping, WeightEMA, check_phase_batches, check_phases, patch_dropouts,
                                       phase_at, phase_overrides)
from atscale.training.guards import refuse_nonfinite_state
from atscale.training.mixing import build_mixing
from atscale.training.objectives import build_objective
from atscale.training.optim import build_optimizer, use_fused
from atscale.training.schedule import StepPlan, plan_at


@dataclass
class Phase:
    """The train loader and settings of one phase of ``data.phases`` (one phase of the run's own settings when empty):
    progressive resizing ("fast" training) or AdvXL's coarse-to-fine stages (Wang et al. 2024, Sec 3). ``attack_eps``
    / ``attack_step`` are fractions of [0, 1] and None where the phase keeps the run's; ``attack_iters`` and
    ``token_drop`` are None unless some phase sets them (then every phase applies its own or the run's value).
    ``applied``: :meth:`Run.apply` has set the attack's iterations and the model's token dropout for this phase."""

    index: int
    image_size: int
    batch_size: int
    loader: Any
    attack_iters: int | None = None
    attack_eps: float | None = None
    attack_step: float | None = None
    token_drop: float | None = None
    applied: bool = False


class Run:
    """Every part of one run and its position (``epoch``, micro-``batch`` within it, optimizer ``step``)."""

    def __init__(self, cfg: Config, device: torch.device, meta: dict, model: nn.Module, val_loader: Any) -> None:
        self.cfg, self.device, self.meta, self.val_loader = cfg, device, meta, val_loader
        self.amp_dtype = resolve_amp(cfg.run.amp, device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.accum = cfg.dist.grad_accum
        self.epoch = self.batch = self.step = 0
        self.train_seconds, self.train_images, self.processes = 0.0, 0, 1  # whole run, across resumes
        self._phase: Phase | None = None
        loader = self.train_loader()
        if self.micro_batches(loader) == 0:
            raise ConfigError(f"data.batch_size = {cfg.data.batch_size} x dist.grad_accum = {self.accum} exceeds the "
                              f"{len(loader.loader.indices)} training images of this rank",
                              "lower data.batch_size or dist.grad_accum")
        self.global_batch = cfg.data.batch_size * self.world * self.accum
        self.fused = use_fused(cfg.perf.fused_optimizer, cfg.optim.name, device, cfg.dist.engine)
        optimizer = build_optimizer(model, cfg.optim, self.global_batch, self.fused)
        self.updater = build_updater(cfg.dist, model, optimizer, device, self.amp_dtype, cfg.data.batch_size,
                                     cfg.optim.clip_grad_norm)
        self.model = self.updater.model
        self.attack = build_attack(cfg.attack, self.amp_dtype, seed=cfg.run.seed + 1009 * self.rank)
        set_stochastic_attack(cfg.attack.stochastic_layers)
        self.base_budget = (float(getattr(self.attack, "eps", 0.0)), float(getattr(self.attack, "step", 0.0)))
        check_phases(cfg.data.phases, self.model, cfg.attack.name, self.attack)
        self.augment = AutoAugmentBatch(cfg.data.autoaugment, cfg.run.seed + 7919 * self.rank) \
            if cfg.data.autoaugment != "none" else None
        self.objective = build_objective(cfg.objective, self.augment, cfg.defense)
        try:
            self.objective.bind(self.model)
        except ValueError as e:
            raise ConfigError(str(e), "use a name from model.named_modules() of the classifier") from None
        self.randaugment = RandAugmentBatch(cfg.data.randaugment_ops, cfg.data.randaugment_magnitude,
                                            cfg.run.seed + 7919 * self.rank) if cfg.data.randaugment_ops > 0 else None
        self.mixing = build_mixing(cfg, cfg.model.num_classes or meta["num_classes"], cfg.run.seed + 7927 * self.rank)
        self.ema = WeightEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.stopper = EarlyStopping(cfg.eval.early_stop_patience)
        compile_model(self.model, cfg.perf.compile)  # after the EMA copy: the average stays an eager module
        self.ckpts = CheckpointDir(RunFolder(cfg.run_dir).checkpoints, cfg.run.keep_last)

    # ------------------------------------------------------------------------------------------- parts

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def eval_model(self) -> nn.Module:
        """What quick checks, the final evaluation and export see: the EMA weights when kept, else the model."""
        return self.ema.module if self.ema else self.model

    @property
    def loop_augment(self):
        """RandAugment or AutoAugment, applied by the loop before mixing (fine-grained AdvProp applies AutoAugment
        inside its objective)."""
        if self.randaugment is not None:
            return self.randaugment
        return None if self.cfg.objective.name == "advprop_fg" else self.augment

    @property
    def phase(self) -> Phase:
        assert self._phase is not None
        return self._phase

    def train_loader(self) -> Any:
        """The train loader of the current epoch's phase (rebuilt, with the phase's settings, when the phase
        changes)."""
        cfg = self.cfg
        ph = phase_at(self.epoch, cfg.data.phases, cfg.data.image_size, cfg.data.batch_size)
        if self._phase is None or self._phase.index != ph.index:
            data_cfg = replace(cfg.data, image_size=ph.image_size, batch_size=ph.batch_size)
            loader = make_loader(cfg.data.root, "train", data_cfg, self.device, cfg.run.seed, train=True,
                                 channels_last=cfg.model.channels_last, rank=self.rank, world_size=self.world)
            if self._phase is None:
                check_phase_batches(cfg.data.phases, len(loader.loader.indices), self.accum)
            self._phase = Phase(ph.index, ph.image_size, ph.batch_size, loader, **phase_overrides(cfg, ph))
        return self._phase.loader

    def micro_batches(self, loader: Any) -> int:
        """Micro-batches of an epoch that make whole optimizer steps."""
        return len(loader) // self.accum * self.accum

    def steps_per_epoch(self, loader: Any) -> int:
        return self.micro_batches(loader) // self.accum * self.objective.replays

    def peak_lr(self) -> float:
        """optim.lr per ``optim.ref_batch`` images, scaled linearly with the current phase's global batch (Goyal et al.
        2017). The schedule's factor is a function of the fractional epoch, continuous across phases; a phase with
        another batch size changes the peak lr by the batch ratio at its first step (the lr per image stays
        continuous), as the progressive-resizing recipes that change the batch do."""
        return self.cfg.optim.lr * self.phase.batch_size * self.world * self.accum / self.cfg.optim.ref_batch

    def plan(self, k: int, steps_per_epoch: int) -> StepPlan:
        """The schedules at optimizer step ``k`` of the current epoch (the attack budget: the phase's, else the
        run's)."""
        eps, step = self.base_budget
        ph = self.phase
        eps = eps if ph.attack_eps is None else ph.attack_eps
        step = step if ph.attack_step is None else ph.attack_step
        return plan_at(self.cfg, self.epoch, k, steps_per_epoch, self.peak_lr(), eps, step)

    def apply(self, plan: StepPlan) -> None:
        """Set the optimizer's lr and the attack's budget to ``plan``'s; on a phase's first step (also after a resume)
        set the attack's iterations and the model's ``PatchDropout`` rate to the phase's (the phases were checked
        against the model and the attack when the run was built)."""
        for g in self.updater.optimizer.param_groups:
            g["lr"] = plan.lr * g.get("lr_scale", 1.0)  # layer-wise lr decay (optim.layer_decay)
        ph = self.phase
        if not ph.applied:
            if ph.attack_iters is not None:
                self.attack.iters = ph.attack_iters
            for m in patch_dropouts(self.model) if ph.token_drop is not None else []:
                m.prob = ph.token_drop
            ph.applied = True
        self.attack.set_budget(plan.eps, plan.step)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The training checkpoint. Every rank calls it (DeepSpeed writes one optimizer partition per rank into the
        checkpoints folder); rank 0 gets the whole dict, the others an empty one. Weights or BN statistics with a NaN
        or inf are refused (``TrainingDiverged``), so the last good checkpoint stays the newest."""
        refuse_nonfinite_state(self.updater.module, self.step)
        epoch, batch = self.epoch, self.batch
        if batch >= self.micro_batches(self.phase.loader):
            epoch, batch = epoch + 1, 0
        state = self.updater.save_state(self.ckpts.root, self.ckpts.step_name(self.step), self.main)
        if not self.main:
            return {}
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
        state.update({"attack": self.attack.state_dict(), "augment": self.augment.state_dict() if self.augment else {},
                      "randaugment": self.randaugment.state_dict() if self.randaugment else {},
                      "mixing": self.mixing.state_dict() if self.mixing else {},
                      "objective": self.objective.state_dict(), "early_stop": self.stopper.state_dict(),
                      "torch_rng": torch.get_rng_state(), "epoch": epoch, "batch": batch, "step": self.step,
                      "train_seconds": self.train_seconds, "train_images": self.train_images,
                      "processes": self.processes,
                      **self._identity()})
        return state

    def _identity(self) -> dict[str, Any]:
        return {"config": self.cfg.to_yaml(), "meta": json.dumps(self.meta), "world_size": self.world,
                "grad_accum": self.accum, "engine": self.updater.engine}

    def load_state_dict(self, state: dict[str, Any], where: Path) -> None:
        """Continue from a training checkpoint read from ``where`` (its folder holds DeepSpeed partitions)."""
        load_model_state(self.model, state["model"], str(where), self.cfg)
        self.updater.load_state(state, where.parent)
        for g in self.updater.optimizer.param_groups:  # the run's perf.fused_optimizer, not the checkpoint's
            if "fused" in g:
                g["fused"], g["foreach"] = (True, False) if self.fused else (None, None)
        self.attack.load_state_dict(state.get("attack", {}))
        if self.augment is not None:
            self.augment.load_state_dict(state.get("augment", {}))
        for part, key in ((self.randaugment, "randaugment"), (self.mixing, "mixing")):
            if part is not None:
                part.load_state_dict(state.get(key, {}))
        self.objective.load_state_dict(state.get("objective", {}))
        self.stopper.load_state_dict(state.get("early_stop", {}))
        if self.ema is not None:
            if "model_ema" not in state:
                raise CheckpointError(f"checkpoint '{where}' has no EMA weights but optim.ema_decay = "
                                      f"{self.cfg.optim.ema_decay}", "resume with optim.ema_decay=0 or start a new run")
            self.ema.load_state_dict(state["model_ema"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("world_size", self.world) != self.world or state.get("grad_accum", self.accum) != self.accum:
            print(f"note: checkpoint was written with world size {state.get('world_size')} x grad_accum "
                  f"{state.get('grad_accum')}; continuing with {self.world} x {self.accum}", file=sys.stderr)
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.train_seconds, self.train_images = state.get("train_seconds", 0.0), state.get("train_images", 0)
        self.processes = state.get("processes", 1) + 1

    def resume(self, found: "Resume | None") -> Path | None:
        """Continue from ``found`` (:func:`find_resume`'s, read before any set-up); returns its path, or None."""
        if found is None:
            return None
        self.load_state_dict(found.state, found.path)
        if self.main:
            print(f"resumed from {found.path}: epoch {self.epoch}, batch {self.batch}, step {self.step}",
                  file=sys.stderr)
        return found.path

    def save(self) -> None:
        """Write ``step_<n>.pt`` (all ranks call this; rank 0 writes the file)."""
        state = self.state_dict()
        if self.main:
            self.ckpts.save(state, self.step)

    @property
    def best_path(self) -> Path:
        return self.ckpts.root / "best.pt"

    def save_best(self, quick: dict) -> None:
        """``best.pt``: the evaluated weights (EMA when on) at the best quick robust check, loadable for eval."""
        weights = {k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}
        save_checkpoint({"model": weights, "step": self.step, "epoch": self.epoch, "batch": 0, "val": quick,
                         "weights": "ema" if self.ema else "raw", **self._identity(), "engine": "ddp"}, self.best_path)

    def load_best(self) -> int | None:
        """Load ``best.pt`` into the evaluated model; returns its step (None when there is none)."""
        if not self.best_path.exists():
            return None
        best = load_checkpoint(self.best_path, map_location=self.device)
        self.eval_model.load_state_dict(best["model"])
        return int(best["step"])


@dataclass
class Resume:
    """A training checkpoint chosen for ``run.resume`` and read before any set-up."""

    path: Path
    state: dict[str, Any]
    changes: list[tuple[str, Any, Any]]  # training keys that differ from the checkpoint's (run.config_change=allow)


def find_resume(cfg: Config, device: torch.device) -> Resume | None:
    """The checkpoint ``run.resume`` names, read and checked before the run folder is touched: ``auto`` takes the
    newest readable checkpoint of the run (``last.pt`` or a newer ``step_*.pt``; an unreadable one is skipped with a
    warning) and says loudly when there is none; a resume whose checkpoint was written under other training keys is
    refused naming them, unless ``run.config_change=allow``."""
    ckpts = CheckpointDir(RunFolder(cfg.run_dir).checkpoints, cfg.run.keep_last)
    candidates, main = ckpts.resolve(cfg.run.resume), dist.rank() == 0
    if not candidates:
        if cfg.run.resume == "auto" and main:
            print(f"warning: run.resume=auto found no checkpoint in {ckpts.root}: starting run "
                  f"'{cfg.run.name}' from step 0 (check run.name / run.out_dir if you meant to continue a run)",
                  file=sys.stderr)
        return None
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location=device)
        except CheckpointError as e:
            if cfg.run.resume != "auto":
                raise
            skipped.append(f"{path.name}: {e.problem}")
            continue
        if skipped and main:
            print(f"warning: skipped unreadable checkpoint(s) {', '.join(skipped)}; resuming from {path}",
                  file=sys.stderr)
        return Resume(path, state, _resume_changes(cfg, state, path))
    raise CheckpointError(f"no readable checkpoint in {ckpts.root}: {', '.join(skipped)}",
                          "restore a checkpoint there, or start anew without --resume (or with another run.name)")


def _resume_changes(cfg: Config, state: dict, path: Path) -> list[tuple[str, Any, Any]]:
    changes = config_changes(config_from_yaml_text(state["config"]), cfg)
    if changes and cfg.run.config_change == "refuse":
        raise CheckpointError(
            f"checkpoint '{path}' was written under another config: {describe_changes(changes)}",
            "resume with the checkpoint's settings (its config.yaml), or pass run.config_change=allow to continue "
            "with the new values")
    if changes and dist.rank() == 0:
        print(f"note: resuming with changed settings (run.config_change=allow): {describe_changes(changes, 20)}",
              file=sys.stderr)
    return changes


def _dataset(cfg: Config, main: bool) -> dict:
    """The dataset's meta; rank 0 builds a missing dataset first, the others read it afterwards."""
    meta = ensure_dataset(cfg.data, seed=cfg.run.seed) if main else None
    dist.barrier()
    return meta if meta is not None else ensure_dataset(cfg.data, seed=cfg.run.seed)


def freeze_parameters(model: nn.Module, prefixes: list[str]) -> int:
    """``requires_grad = False`` for parameters named by ``model.freeze`` prefixes; returns how many were frozen."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unknown:
        raise ConfigError(f"model.freeze names no parameters: {unknown}",
                          f"use prefixes of model.named_parameters(), e.g. {names[0].rsplit('.', 1)[0]}")
    frozen = 0
    for n, p in model.named_parameters():
        if any(n == q or n.startswith(q + ".") for q in prefixes):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def _model(cfg: Config, meta: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, cfg.defense, meta["num_classes"])
    if cfg.model.init_from:  # a resume then loads its checkpoint over these
        reset = init_from_pretrained(model, cfg.model.init_from)
        if reset and cfg.defense.train == "preprocessor":
            raise CheckpointError(f"model.init_from = '{cfg.model.init_from}' is the fixed target of the defense, but "
                                  f"it classifies another number of classes than this dataset ({meta['num_classes']})",
                                  "give the target trained on these classes")
        if dist.rank() == 0:
            print(f"initialized from {cfg.model.init_from}" + (f" (re-initialized {', '.join(reset)}: another class "
                  f"count)" if reset else ""), file=sys.stderr)
    init_defense_from(model, cfg.defense)
    freeze_parameters(model, cfg.model.freeze)
    if cfg.schedule.bn_eval_last_epochs > 0:
        require_batchnorm(model, f"schedule.bn_eval_last_epochs = {cfg.schedule.bn_eval_last_epochs}")
    if cfg.dist.sync_bn:
        require_batchnorm(model, "dist.sync_bn")
    if cfg.perf.activation_checkpointing != "off":
        enable_activation_checkpointing(model, attack=cfg.perf.activation_checkpointing == "all")
    if cfg.dist.sync_bn and dist.world_size() > 1:
        model = convert_sync_bn(model, device)
    return model.to(device)


def build(cfg: Config, device: torch.device) -> Run:
    """Every part of a run from its config, on ``device``, in the current distributed world; rank 0 writes the
    resolved config into the run folder."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    set_backend_flags(cfg.perf, device)
    main = dist.rank() == 0
    if main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunFolder(cfg.run_dir).config)
    meta = _dataset(cfg, main)
    model = _model(cfg, meta, device)
    val_loader = make_loader(cfg.data.root, "val", cfg.data, device, cfg.run.seed, train=False,
                             channels_last=cfg.model.channels_last, rank=dist.rank(), world_size=dist.world_size())
    return Run(cfg, device, meta, model, val_loader)


__all__ = ["Run", "Phase", "Resume", "build", "find_resume"]
