"""``main(cfg)``: wires config -> data, model, attack, objective, optimizer -> engine loops; resume, eval, export.

Entry point for ``atscale train`` and ``python -m atscale.train --config ... [key.sub=value ...]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from atscale import distributed as dist
from atscale import preempt
from atscale.attacks import PGD, build_attack
from atscale.checkpoint import CheckpointDir, CheckpointError, load_checkpoint, save_checkpoint
from atscale.controls import AttackBudget, EarlyStopping, WeightEMA, phase_at
from atscale.config import Config, load_config, save_config
from atscale.data import ensure_dataset, make_loader
from atscale.data.augment import AutoAugmentBatch
from atscale.engine import evaluate, refuse_nonfinite_state, train_one_epoch
from atscale.export import export_timm
from atscale.layers.checkpointing import enable_activation_checkpointing
from atscale.models import build_from_config
from atscale.objectives import build_objective
from atscale.optim import build_optimizer, lr_factor, set_lr, use_fused
from atscale.perf import compile_model, set_backend_flags
from atscale.report import plot_accuracy_vs_steps, plot_training, results_table, write_report
from atscale.runlog import RunLog
from atscale.updater import build_updater


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def eval_attacks(eval_cfg, amp_dtype: torch.dtype | None, seed: int, steps: list[int] | None = None) -> dict[str, PGD]:
    """PGD-k for each k (budgets in 0..255 units converted here); step 0 means eps / k."""
    eps = eval_cfg.eps / 255.0
    out = {}
    for k in steps or eval_cfg.steps:
        step = eval_cfg.step / 255.0 if eval_cfg.step > 0 else eps / k
        out[f"pgd{k}"] = PGD(eps, step, k, targeted=eval_cfg.targeted,
                             clean_start_prob=0.0 if eval_cfg.random_start else 1.0, amp_dtype=amp_dtype,
                             keep_best=True, seed=seed + 1)
    return out


def _load_model_state(model: torch.nn.Module, state: dict, where: str, cfg: Config) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"checkpoint '{where}' does not fit model '{cfg.model.arch}' {cfg.model.kwargs}: "
                              f"{' '.join(first)}. Use the same model.* settings as the run that wrote it") from e


def write_eval(run_dir: Path, results: dict, title: str) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "eval.json"
    path.write_text(json.dumps(results, indent=2))
    plot = plot_accuracy_vs_steps(results, run_dir / "accuracy_vs_steps.png", title)
    return path, plot


def main(cfg: Config) -> dict[str, Any]:
    """Train, evaluate, export and report one run; under torchrun / SLURM every rank calls this (rank 0 writes)."""
    env = dist.DistEnv.from_env()
    device = dist.init(env, cfg.run.device, cfg.dist.backend, cfg.dist.timeout_min,
                       group_required=cfg.dist.engine == "deepspeed")
    try:
        return _main(cfg, env, device)
    finally:
        dist.cleanup()


def _main(cfg: Config, env: dist.DistEnv, device: torch.device) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    amp_dtype = resolve_amp(cfg.run.amp, device)
    set_backend_flags(cfg.perf, device)
    rank, world = dist.rank(), dist.world_size()
    main_rank = rank == 0
    run_dir = cfg.run_dir
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        meta = ensure_dataset(cfg.data, seed=cfg.run.seed)
    dist.barrier()  # rank 0 builds a missing dataset; the others read it afterwards
    if not main_rank:
        meta = ensure_dataset(cfg.data, seed=cfg.run.seed)

    torch.manual_seed(cfg.run.seed)
    model = build_from_config(cfg.model, meta["num_classes"])
    if cfg.perf.activation_checkpointing != "off":
        enable_activation_checkpointing(model, attack=cfg.perf.activation_checkpointing == "all")
    if cfg.dist.sync_bn and world > 1:
        model = dist.convert_sync_bn(model, device)
    model = model.to(device)
    loader_args = dict(channels_last=cfg.model.channels_last, rank=rank, world_size=world)
    val_loader = make_loader(cfg.data.root, "val", cfg.data, device, cfg.run.seed, train=False, **loader_args)
    phase = {"index": -1}

    def train_loader_for(at_epoch: int):
        """The train loader of ``at_epoch``'s progressive-resizing phase (rebuilt when the phase changes)."""
        idx, size, bs = phase_at(at_epoch, cfg.data.phases, cfg.data.image_size, cfg.data.batch_size)
        if idx != phase["index"]:
            data_cfg = replace(cfg.data, image_size=size, batch_size=bs)
            phase.update(index=idx, batch=bs, size=size,
                         loader=make_loader(cfg.data.root, "train", data_cfg, device, cfg.run.seed, train=True,
                                            **loader_args))
        return phase["loader"]

    train_loader = train_loader_for(0)
    accum = cfg.dist.grad_accum
    spe = len(train_loader) // accum
    if spe == 0:
        raise ValueError(f"data.batch_size = {cfg.data.batch_size} x dist.grad_accum = {accum} exceeds the "
                         f"{len(train_loader.loader.indices) // world} training images per rank; lower either")
    global_batch = cfg.data.batch_size * world * accum
    fused = use_fused(cfg.perf.fused_optimizer, cfg.optim.name, device, cfg.dist.engine)
    optimizer = build_optimizer(model, cfg.optim, global_batch, fused)
    updater = build_updater(cfg.dist, model, optimizer, device, amp_dtype, cfg.data.batch_size)
    model = updater.model
    attack = build_attack(cfg.attack, amp_dtype, seed=cfg.run.seed + 1009 * rank)
    augment = AutoAugmentBatch(cfg.data.autoaugment, cfg.run.seed + 7919 * rank) \
        if cfg.data.autoaugment != "none" else None
    objective = build_objective(cfg.objective, augment)
    budget = AttackBudget(attack, cfg.attack.warmup_epochs)
    ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    stopper = EarlyStopping(cfg.eval.early_stop_patience)
    compile_model(model, cfg.perf.compile)  # after the EMA copy: the average stays an eager module
    eval_model = ema.module if ema else model  # what quick checks, the final eval and export see
    loop_augment = None if cfg.objective.name == "advprop_fg" else augment  # fine-grained: the objective applies it
    ckpts = CheckpointDir(run_dir / "checkpoints", cfg.run.keep_last)

    epoch, batch, step = 0, 0, 0
    resume_from = ckpts.resolve(cfg.run.resume)
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        _load_model_state(model, state["model"], str(resume_from), cfg)
        updater.load_state(state, resume_from.parent)
        for g in updater.optimizer.param_groups:  # the run's perf.fused_optimizer, not the checkpoint's
            if "fused" in g:
                g["fused"], g["foreach"] = (True, False) if fused else (None, None)
        attack.load_state_dict(state.get("attack", {}))
        if augment is not None:
            augment.load_state_dict(state.get("augment", {}))
        objective.load_state_dict(state.get("objective", {}))
        stopper.load_state_dict(state.get("early_stop", {}))
        if ema is not None:
            if "model_ema" not in state:
                raise CheckpointError(f"checkpoint '{resume_from}' has no EMA weights but optim.ema_decay = "
                                      f"{cfg.optim.ema_decay}; resume with optim.ema_decay=0 or start a new run")
            ema.load_state_dict(state["model_ema"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("world_size", world) != world or state.get("grad_accum", accum) != accum:
            print(f"note: checkpoint was written with world size {state.get('world_size')} x grad_accum "
                  f"{state.get('grad_accum')}; continuing with {world} x {accum}", file=sys.stderr)
        epoch, batch, step = state["epoch"], state["batch"], state["step"]
        if main_rank:
            print(f"resumed from {resume_from}: epoch {epoch}, batch {batch}, step {step}", file=sys.stderr)

    log = RunLog(run_dir, cfg.log.tensorboard) if main_rank else None
    progress = cfg.log.progress and main_rank
    if log:
        log.write("start", step, device=str(device), amp=str(amp_dtype), steps_per_epoch=spe * objective.replays,
                  peak_lr=optimizer.param_groups[0]["lr"],
                  world_size=world, global_batch=global_batch, resumed_from=str(resume_from) if resume_from else None,
                  threads=torch.get_num_threads(), channels_last=cfg.model.channels_last,
                  fused_optimizer=bool(updater.optimizer.param_groups[0].get("fused")), perf=asdict(cfg.perf))
    quick = eval_attacks(cfg.eval, amp_dtype, cfg.run.seed, [cfg.eval.quick_steps]) if cfg.eval.every_epochs else {}

    def attack_eps() -> float:
        return float(getattr(attack, "eps", 0.0)) * 255.0

    def best_state(at_step: int, at_epoch: int, q: dict) -> dict:
        """A stand-alone checkpoint of the weights being evaluated (EMA when on) at the best quick robust check."""
        return {"model": {k: v.detach().clone() for k, v in eval_model.state_dict().items()}, "step": at_step,
                "epoch": at_epoch, "batch": 0, "val": q, "config": cfg.to_yaml(), "meta": json.dumps(meta),
                "world_size": world, "grad_accum": accum, "engine": "ddp", "weights": "ema" if ema else "raw"}

    def checkpoint(at_epoch: int, at_batch: int, at_step: int) -> None:
        """All ranks call this (DeepSpeed writes one optimizer partition per rank); rank 0 writes the step file.
        Weights with a NaN or inf are never written: the run stops and the last good checkpoint stays the newest."""
        refuse_nonfinite_state(updater.module, at_step)
        if at_batch >= len(phase["loader"]) // accum * accum:
            at_epoch, at_batch = at_epoch + 1, 0
        state = updater.save_state(ckpts.root, ckpts.step_name(at_step), main_rank)
        if not main_rank:
            return
        if ema is not None:
            state["model_ema"] = ema.state_dict()
        state.update({"attack": attack.state_dict(), "augment": augment.state_dict() if augment else {},
                      "objective": objective.state_dict(), "early_stop": stopper.state_dict(),
                      "torch_rng": torch.get_rng_state(), "epoch": at_epoch,
                      "batch": at_batch, "step": at_step, "config": cfg.to_yaml(), "meta": json.dumps(meta),
                      "world_size": world, "grad_accum": accum, "engine": updater.engine})
        ckpts.save(state, at_step)

    summary: dict[str, Any] = {}
    stopped = False
    reason = ""
    best_path = run_dir / "checkpoints" / "best.pt"
    watch_best = bool(cfg.eval.select_best or cfg.eval.early_stop_patience)
    t_train = time.perf_counter()
    while epoch < cfg.schedule.epochs and not stopped:
        train_loader = train_loader_for(epoch)
        train_loader.set_epoch(epoch)
        nb = len(train_loader) // accum * accum  # micro-batches per epoch
        cur_epoch, spe = epoch, nb // accum * objective.replays  # optimizer steps per epoch
        peak_lr = cfg.optim.lr * phase["batch"] * world * accum / cfg.optim.ref_batch
        first, done_before = step, batch // accum * objective.replays  # steps of this epoch already done (resume)

        def begin_step(s: int) -> float:
            """Per-step schedules: the learning rate and the attack budget's warmup, at this epoch's fraction."""
            k = done_before + s - first
            budget.apply(cur_epoch + k / spe)
            return set_lr(updater.optimizer, peak_lr, lr_factor(cur_epoch * spe + k, spe, cfg.schedule))

        def after_step(s: int, m: dict) -> bool:
            nonlocal reason
            if ema is not None:
                ema.update(model, s)
            end_of_epoch = m["batch"] == nb
            if log and (s % cfg.log.every_steps == 0 or end_of_epoch):
                log.write("train", s, epoch=cur_epoch + m["batch"] / nb, eps=attack_eps(), **m)
            if cfg.run.max_steps > 0 and s >= cfg.run.max_steps:
                reason = "max_steps"
            elif dist.any_rank(preempt.stop_requested(), device):
                reason = "preempted"
            if reason or (cfg.run.ckpt_every_steps and s % cfg.run.ckpt_every_steps == 0 and not end_of_epoch):
                checkpoint(cur_epoch, m["batch"], s)
            return bool(reason)

        bn_eval = epoch >= cfg.schedule.epochs - cfg.schedule.bn_eval_last_epochs
        res = train_one_epoch(updater, train_loader, attack, objective, lr_at=begin_step, first_step=step,
                              skip_batches=batch, amp_dtype=amp_dtype, augment=loop_augment, after_step=after_step,
                              progress=progress, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}", bn_eval=bn_eval)
        step += res.pop("steps")
        stopped = res.pop("stopped")
        summary = res
        if stopped:
            break
        epoch, batch = epoch + 1, 0
        line = f"epoch {epoch}/{cfg.schedule.epochs}: loss {res.get('loss', float('nan')):.4f} " \
               f"train acc {100 * res.get('acc', 0):.1f}% ({res['img_per_s']:.1f} img/s)"
        if quick and epoch % cfg.eval.every_epochs == 0:
            q = evaluate(eval_model, val_loader, quick, amp_dtype=amp_dtype, max_images=cfg.eval.quick_images,
                         progress=progress, desc="val")
            qk = next(iter(quick))
            improved, early = stopper.update(q[qk]["acc"], step)
            if improved and watch_best and main_rank:
                save_checkpoint(best_state(step, epoch, q), best_path)
            if log:
                log.write("val", step, epoch=epoch, clean_acc=q["clean"]["acc"], pgd_acc=q[qk]["acc"], attack=qk,
                          best_pgd_acc=stopper.best)
            line += f" | val clean {100 * q['clean']['acc']:.1f}% {qk} {100 * q[qk]['acc']:.1f}%"
            if early and epoch < cfg.schedule.epochs:
                reason = "early_stop"
                line += f" | early stop: no better {qk} for {stopper.bad} checks (best {100 * stopper.best:.1f}% " \
                        f"at step {stopper.best_step})"
                epoch = cfg.schedule.epochs  # ends the loop; the final eval and export follow
        checkpoint(epoch, 0, step)
        if log:
            log.write("epoch", step, epoch=epoch, image_size=phase["size"], batch_size=phase["batch"],
                      bn_eval=bn_eval, **res)
            print(line, file=sys.stderr)
    summary.update(steps=step, seconds=time.perf_counter() - t_train, epoch=epoch, stopped=stopped,
                   early_stopped=reason == "early_stop")
    if stopped:
        if log:
            log.write("stopped", step, epoch=epoch, reason=reason)
            log.close()
        dist.barrier()  # the checkpoint is on disk before any rank returns
        return {"stopped": True, "reason": reason, "step": step, "run_dir": str(run_dir)}

    if watch_best and cfg.eval.select_best:
        dist.barrier()
        if best_path.exists():
            best = load_checkpoint(best_path, map_location=device)
            eval_model.load_state_dict(best["model"])
            summary["selected_step"] = best["step"]
            if main_rank:
                print(f"final eval on the best quick check: step {best['step']} (best.pt)", file=sys.stderr)
    model = eval_model
    results = evaluate(model, val_loader, eval_attacks(cfg.eval, amp_dtype, cfg.run.seed), amp_dtype=amp_dtype,
                       max_images=cfg.eval.max_images, progress=progress, desc="final eval")
    if not main_rank:
        return {"stopped": False, "step": step, "eval": results, "run_dir": str(run_dir), "train": summary}
    _, plot = write_eval(run_dir, results, f"{cfg.model.arch}, eps {cfg.eval.eps:g}/255, "
                                           f"{'targeted' if cfg.eval.targeted else 'untargeted'}")
    log.write("eval", step, **{f"{k}_acc": v["acc"] for k, v in results.items()})
    print(results_table(results), file=sys.stderr)
    export_dir = None
    if cfg.run.export:
        export_dir = export_timm(model, run_dir / "export", mean=cfg.model.mean, std=cfg.model.std,
                                 input_size=cfg.data.val_size, crop_pct=cfg.data.val_crop_ratio,
                                 label_names=meta.get("classes"), extra={"eval": results, "config": cfg.to_dict()})
    log.close()
    plots = [plot] + [p for p in [plot_training(run_dir / "log.jsonl", run_dir / "training.png")] if p]
    report = write_report(run_dir, cfg, results, meta, summary, plots, export_dir)
    print(f"done in {time.perf_counter() - t_start:.0f} s: report {report}", file=sys.stderr)
    return {"stopped": False, "step": step, "eval": results, "run_dir": str(run_dir), "report": str(report),
            "train": summary}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="atscale train", description="Adversarial training with PGD in the loop.")
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml)")
    p.add_argument("--resume", help="'auto' (last checkpoint of this run, if any) or a checkpoint path")
    p.add_argument("--twin", choices=["digits"], help="run the preset's small-scale twin (atscale.presets): same "
                   "protocol on the embedded digits data with a narrow network, minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. attack.eps=8 optim.lr=0.2")
    return p.parse_known_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        raise SystemExit(f"atscale train: unknown option(s) {bad}; use --config, --resume and section.key=value")
    overrides = list(args.overrides) + extra
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    main(load_config(args.config, overrides, twin=args.twin))
    return 0


if __name__ == "__main__":
    from atscale.cli import main as _cli_main

    sys.exit(_cli_main(["train", *sys.argv[1:]]))
