"""``main(cfg)``: one training run from start (or resume) to the report: build the run, train epoch after epoch with a
quick robust check and a checkpoint at each end, then the final evaluation, export and report.

Every robust accuracy it reports (log.jsonl's quick checks, eval.json, report.md) comes from the one evaluator
(:func:`atscale.evaluation.evaluator.run_suite`) running suites built from the ``eval`` config. Under torchrun / SLURM
every rank calls ``main``; rank 0 writes logs, checkpoints, reports and exports.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from atscale import distributed as dist
from atscale.config import Config
from atscale.config.units import to_pixels
from atscale.evaluation.checkpoint_eval import eval_loader, ffcv_record
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.model_info import robustbench_model_info
from atscale.evaluation.outputs import write_outputs
from atscale.evaluation.suites import get_suite, quick_check_suite
from atscale.defenses.export import preprocessor_files
from atscale.models.export import export_timm
from atscale.reporting.report import plot_training, results_table, write_report
from atscale.reporting.runlog import RunLog
from atscale.training import preempt
from atscale.training.loop import EpochResult, train_epoch
from atscale.errors import RunEnvironmentError
from atscale.run_folder import RunFolder, RunLock
from atscale.training.run import Resume, Run, build, find_resume
from atscale.training.schedule import StepPlan


def main(cfg: Config) -> dict[str, Any]:
    """Train, evaluate, export and report one run; returns ``{"stopped", "step", "eval", "run_dir", ...}``."""
    env = dist.DistEnv.from_env()
    device = dist.init(env, cfg.run.device, cfg.dist.backend, cfg.dist.timeout_min,
                       group_required=cfg.dist.engine == "deepspeed")
    try:
        found = find_resume(cfg, device)  # a bad checkpoint or config change stops before the folder is touched
        lock = claim_run_folder(cfg, device)
        try:
            return fit(build(cfg, device), found)
        finally:
            if lock is not None:
                lock.release()
    finally:
        dist.cleanup()


def claim_run_folder(cfg: Config, device: torch.device) -> RunLock | None:
    """Rank 0 takes the run folder's lock (a second process on the folder is refused, on every rank) and removes
    the temporary files that killed writers left there; returns the lock to release at the end."""
    lock, error = None, None
    if dist.rank() == 0:
        folder = RunFolder(cfg.run_dir)
        try:
            lock = folder.lock()
        except RunEnvironmentError as e:
            error = e
        else:
            removed = folder.remove_stale_temporaries()
            if removed:
                print(f"removed {len(removed)} temporary file(s) left by an interrupted run: "
                      f"{', '.join(p.name for p in removed[:4])}{' ...' if len(removed) > 4 else ''}",
                      file=sys.stderr)
    if dist.any_rank(error is not None, device):
        raise error or RunEnvironmentError(f"rank 0 could not lock the run folder '{cfg.run_dir}'",
                                           "see rank 0's error")
    return lock


class StepHooks:
    """What happens after every optimizer step: EMA update, the train log record, stop requests (run.max_steps,
    preemption; all ranks agree) and the mid-epoch checkpoints of ``run.ckpt_every_steps``."""

    def __init__(self, run: Run, log: RunLog | None):
        self.run, self.log = run, log

    def __call__(self, m: dict, plan: StepPlan, end_of_epoch: bool) -> str:
        run, cfg = self.run, self.run.cfg
        if run.ema is not None:
            run.ema.update(run.model, run.step)
        if self.log and (run.step % cfg.log.every_steps == 0 or end_of_epoch):
            self.log.write("train", run.step, epoch=plan.epoch, eps=to_pixels(plan.eps), batch=run.batch, **m)
        reason = ""
        if cfg.run.max_steps > 0 and run.step >= cfg.run.max_steps:
            reason = "max_steps"
        elif dist.any_rank(preempt.stop_requested(), run.device):
            reason = preempt.stop_reason() if preempt.stop_requested() else "preempted"
        if reason or (cfg.run.ckpt_every_steps and run.step % cfg.run.ckpt_every_steps == 0 and not end_of_epoch):
            run.save()
        return reason


def eval_seed(cfg: Config) -> int:
    return cfg.run.seed if cfg.eval.seed < 0 else cfg.eval.seed


def quick_check(run: Run, log: RunLog | None) -> tuple[str, bool]:
    """The quick robust check at an epoch's end (same rule and attack as the final evaluation's row of that k);
    returns the log line and whether early stopping asks to stop."""
    cfg = run.cfg
    doc = run_suite(run.eval_model, run.val_loader, quick_check_suite(cfg.eval), amp_dtype=run.amp_dtype,
                    max_images=cfg.eval.quick_images, seed=eval_seed(cfg), progress=cfg.log.progress and run.main,
                    probes=False, desc="val")
    res = doc["results"]
    label = f"pgd{cfg.eval.quick_steps}"
    improved, early = run.stopper.update(res[label]["acc"], run.step)
    if improved and (cfg.eval.select_best or cfg.eval.early_stop_patience) and run.main:
        run.save_best(res)
    if log:
        log.write("val", run.step, epoch=run.epoch, clean_acc=res["clean"]["acc"], pgd_acc=res[label]["acc"],
                  pgd_adv_acc=res[label]["adv_acc"], attack=label, n=doc["n"], best_pgd_acc=run.stopper.best)
    line = f" | val clean {100 * res['clean']['acc']:.1f}% {label} {100 * res[label]['acc']:.1f}%"
    stop = early and run.epoch < cfg.schedule.epochs
    if stop:
        line += f" | early stop: no better {label} for {run.stopper.bad} checks (best " \
                f"{100 * run.stopper.best:.1f}% at step {run.stopper.best_step})"
    return line, stop


def end_epoch(run: Run, log: RunLog | None, res: EpochResult) -> bool:
    """After a whole epoch: the quick check (every ``eval.every_epochs``), a checkpoint, the epoch record. Returns
    True when early stopping ends training."""
    cfg, averages, img_per_s = run.cfg, res.averages, res.img_per_s
    run.epoch, run.batch = run.epoch + 1, 0
    line = f"epoch {run.epoch}/{cfg.schedule.epochs}: loss {averages.get('loss', float('nan')):.4f} train acc " \
           f"{100 * averages.get('acc', 0):.1f}% ({img_per_s:.1f} img/s)"
    early = False
    if cfg.eval.every_epochs and run.epoch % cfg.eval.every_epochs == 0:
        extra, early = quick_check(run, log)
        line += extra
    if early:
        run.epoch = cfg.schedule.epochs  # the final evaluation and export follow
    run.save()
    if log:
        log.write("epoch", run.step, epoch=run.epoch, image_size=run.phase.image_size,
                  batch_size=run.phase.batch_size, bn_eval=res.bn_eval, **averages, img_per_s=img_per_s)
    if run.main:
        print(line, file=sys.stderr)
    return early


def train(run: Run, log: RunLog | None) -> dict[str, Any]:
    """Epochs until ``schedule.epochs``, early stopping or a stop request; returns the training summary (``stopped``
    holds the reason when it stopped early; time and images are the whole run's, across resumes)."""
    hooks, last, stopped, early = StepHooks(run, log), {}, "", False
    while run.epoch < run.cfg.schedule.epochs:
        res = train_epoch(run, hooks)
        last, stopped = res.averages or last, res.stopped
        if stopped:
            break
        early = end_epoch(run, log, res)
        if early:
            break
    return {"stopped": stopped, "early_stopped": early, **last, "seconds": run.train_seconds, "epoch": run.epoch,
            "img_per_s": run.train_images / max(1e-9, run.train_seconds), "processes": run.processes}


def stop_message(run: Run, reason: str) -> str:
    if reason == "max_steps":
        return f"stopped at step {run.step}: reached run.max_steps = {run.cfg.run.max_steps}; checkpoint " \
               f"{run.ckpts.last}; to continue, raise run.max_steps (0 = to the end) and pass --resume auto"
    return f"stopped at step {run.step} ({reason}); checkpoint {run.ckpts.last}; continue with --resume auto"


def start_log(run: Run, found: Resume | None) -> RunLog | None:
    """Rank 0's log, with a ``resume`` record first when continuing (checkpoint, changed settings) and the ``start``
    record (records after its step in the earlier part of log.jsonl were re-done or discarded;
    :func:`atscale.reporting.runlog.read_log` drops them)."""
    if not run.main:
        return None
    cfg = run.cfg
    log = RunLog(cfg.run_dir, cfg.log.tensorboard)
    if found is not None:
        log.write("resume", run.step, checkpoint=str(found.path),
                  config_changes=[f"{k}: {a!r} -> {b!r}" for k, a, b in found.changes])
    log.write("start", run.step, device=str(run.device), amp=str(run.amp_dtype), world_size=run.world,
              steps_per_epoch=run.steps_per_epoch(run.train_loader()), peak_lr=run.peak_lr(),
              global_batch=run.global_batch, resumed_from=str(found.path) if found else None,
              threads=torch.get_num_threads(), channels_last=cfg.model.channels_last,
              fused_optimizer=bool(run.updater.optimizer.param_groups[0].get("fused")), perf=asdict(cfg.perf))
    return log


def fit(run: Run, found: Resume | None = None) -> dict[str, Any]:
    """Continue from ``found`` (:func:`find_resume`'s) when given, train, then evaluate, export and report (or stop at
    a step with a checkpoint)."""
    t_start = time.perf_counter()
    cfg = run.cfg
    run.resume(found)
    log = start_log(run, found)
    summary = train(run, log)
    summary["steps"] = run.step
    if summary["stopped"]:
        if run.main:
            print(stop_message(run, summary["stopped"]), file=sys.stderr)
        if log:
            log.write("stopped", run.step, epoch=run.epoch, reason=summary["stopped"])
            log.close()
        dist.barrier()  # the checkpoint is on disk before any rank returns
        return {"stopped": True, "reason": summary["stopped"], "step": run.step, "run_dir": str(cfg.run_dir)}
    return finish(run, log, summary, t_start)


def final_eval_data(run: Run) -> tuple[Any, dict]:
    """The final evaluation's batches and their eval.json ``preprocess`` record: the run's val loader, or the val JPEGs
    with RobustBench's pre-processing when ``eval.preprocess`` asks for it (the quick checks stay on the .beton)."""
    cfg = run.cfg
    if cfg.eval.preprocess == "ffcv":
        return run.val_loader, ffcv_record(cfg)
    return eval_loader(cfg, run.meta, run.device, eval_seed(cfg))


def finish(run: Run, log: RunLog | None, summary: dict, t_start: float) -> dict[str, Any]:
    """The final evaluation (``eval.suite``, on ``best.pt`` with ``eval.select_best``), export and report."""
    cfg = run.cfg
    if cfg.eval.select_best:
        dist.barrier()
        best = run.load_best()
        if best is not None:
            summary["selected_step"] = best
            if run.main:
                print(f"final eval on the best quick check: step {best} (best.pt)", file=sys.stderr)
    loader, pre = final_eval_data(run)
    doc = run_suite(run.eval_model, loader, get_suite(cfg.eval.suite, cfg.eval), amp_dtype=run.amp_dtype,
                    max_images=cfg.eval.max_images, seed=eval_seed(cfg), progress=cfg.log.progress and run.main,
                    desc="final eval")
    doc["preprocess"] = pre
    out = {"stopped": False, "step": run.step, "eval": doc["results"], "run_dir": str(cfg.run_dir), "train": summary}
    if not run.main:
        return out
    title = f"{cfg.model.arch}, suite {doc['suite']['name']}"
    paths = write_outputs(doc, cfg.run_dir, title=title)
    log.write("eval", run.step, **{f"{k}_acc": v["acc"] for k, v in doc["results"].items()})
    print(results_table(doc["results"]), file=sys.stderr)
    export_dir = None
    if cfg.run.export:
        export_dir = export_timm(run.eval_model, RunFolder(cfg.run_dir).export, mean=cfg.model.mean, std=cfg.model.std,
                                 input_size=cfg.data.val_size, crop_pct=cfg.data.val_crop_ratio,
                                 label_names=run.meta.get("classes"),
                                 extra={"eval": doc["results"], "config": cfg.to_dict()},
                                 robustbench=robustbench_model_info(cfg, run.meta, doc, eval_source=str(paths["json"])),
                                 files=preprocessor_files(run.eval_model))
    log.close()
    plots = [paths[k] for k in ("iterations_plot", "eps_plot") if paths.get(k)]
    plots += [p for p in [plot_training(cfg.run_dir / "log.jsonl", cfg.run_dir / "training.png")] if p]
    report = write_report(cfg.run_dir, cfg, doc, run.meta, summary, plots, export_dir)
    print(f"done in {time.perf_counter() - t_start:.0f} s: report {report}", file=sys.stderr)
    return {**out, "report": str(report)}


__all__ = ["main", "fit", "train", "finish", "StepHooks"]
