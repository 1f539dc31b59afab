"""``atscale dense train | eval | dag | transfer``: the dense tasks of Xie thesis Ch. 2 (segmentation and detection on
the embedded scenes or Pascal VOC) and Dense Adversary Generation against them.

- ``train``: :func:`atscale.training.dense.train_dense` into ``run.out_dir/run.name``.
- ``eval``: the clean metric of a run (mIoU, or mAP at IoU 0.5).
- ``dag``: DAG on the run's val images (``dag.*`` overrides): clean / DAG / PERM metric, perceptibility p, iterations,
  active targets per iteration; ``<run>/dag/{dag.json, dag.md, perturbations.pt, examples.png, active.png}``.
- ``transfer``: perturbation files (one, or several summed: Sec 2.4.3's r_A + r_B) added to the images another run
  sees, optionally permuted; the metric it keeps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from atscale.config.dense import DenseConfig, load_dense_config, with_dense_overrides
from atscale.errors import ConfigError, DatasetError
from atscale.fsio import atomic_write_bytes

PERTURBATIONS = "perturbations.pt"


def _device(name: str = "auto") -> torch.device:
    from atscale.distributed.env import resolve_device

    return resolve_device(name)


def train(config: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from atscale.training.dense import train_dense

    return train_dense(load_dense_config(config, overrides))


def _val_identity(cfg: DenseConfig) -> dict[str, Any]:
    d = cfg.data
    keys = ("source", "root", "year", "image_size") + (("n_val", "val_seed", "max_digits", "digit_size")
                                                       if d.source == "scenes" else ())
    ident = {k: getattr(d, k) for k in keys}
    if d.source == "voc":  # VOC's segmentation and detection val lists are different images; the scenes are shared
        ident["task"] = cfg.task
    return ident


def evaluate(run: str | Path) -> dict[str, Any]:
    from atscale.data.dense import dense_split
    from atscale.evaluation.dense_eval import clean_metrics
    from atscale.training.dense import load_dense_run

    device = _device()
    cfg, model = load_dense_run(run, device)
    val = dense_split(cfg.data, cfg.task, "val")
    out = clean_metrics(model, val, cfg.task, cfg.data.eval_batch_size, device)
    print(json.dumps(out))
    return out


def dag(run: str | Path, overrides: Sequence[str] = (), progress: bool = True,
        out_dir: str | Path | None = None) -> dict[str, Any]:
    """DAG on a run's val images; writes ``out_dir`` (default ``<run>/dag/``, so one run can keep several DAG settings)
    and returns the report."""
    from atscale.data.dense import dense_split
    from atscale.evaluation.dense_eval import perm_scores, run_dag, score_perturbed
    from atscale.reporting.dense_figures import plot_active, plot_examples
    from atscale.checkpoint import save_checkpoint
    from atscale.training.dense import load_dense_run

    device = _device()
    cfg, model = load_dense_run(run, device)
    cfg = with_dense_overrides(cfg, overrides, ("dag",))
    val = dense_split(cfg.data, cfg.task, "val")
    out = run_dag(model, val, cfg.task, cfg.dag, device, limit=cfg.dag.images, progress=progress)
    n, bs = out.r.shape[0], cfg.data.eval_batch_size
    clean = score_perturbed(model, val, cfg.task, device, None, bs, limit=n)
    adv = score_perturbed(model, val, cfg.task, device, out.r, bs)
    perm = perm_scores(model, val, cfg.task, out.r, cfg.dag.perm_draws, cfg.dag.seed + 1, device, bs)
    report = _report(cfg, n, clean, adv, perm, out)
    folder = Path(out_dir) if out_dir else Path(run) / "dag"
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"r": out.r, "val": _val_identity(cfg), "arch": cfg.model.arch, "task": cfg.task,
                     "dag": cfg.to_dict()["dag"]}, folder / PERTURBATIONS)
    atomic_write_bytes(folder / "dag.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(folder / "dag.md", dag_markdown(report).encode())
    plot_examples(_examples(model, val, cfg.task, out.r, device), cfg.task, folder / "examples.png",
                  f"{cfg.model.arch}: clean, r (x{_R_GAIN}), DAG")
    plot_active(out.active_curve, folder / "active.png", f"{cfg.model.arch}: DAG active targets")
    print(dag_markdown(report))
    return report


_R_GAIN = 20  # the perturbation shown at 20x so it is visible at all


@torch.no_grad()
def _examples(model, dataset, task: str, r: torch.Tensor, device: torch.device, k: int = 4) -> dict[str, Any]:
    """The first ``k`` val images, their perturbations and the model's predictions before and after."""
    from atscale.data.dense import collate_dense

    batch = collate_dense([dataset[i] for i in range(min(k, r.shape[0]))])
    x = batch["image"]
    x_adv = (x + r[:x.shape[0]].float()).clamp(0, 1)

    def predict(images: torch.Tensor):
        out = model(images.to(device))
        return out.argmax(1).cpu() if task == "segmentation" else [{k_: v.cpu() for k_, v in o.items()} for o in out]

    return {"image": x, "adv": x_adv, "r": (0.5 + _R_GAIN * r[:x.shape[0]].float()).clamp(0, 1), "gt_mask":
            batch["mask"], "gt_boxes": batch["boxes"], "gt_labels": batch["labels"], "clean": predict(x),
            "dag": predict(x_adv)}


def _metric_name(task: str) -> str:
    return "miou" if task == "segmentation" else "map50"


def _report(cfg: DenseConfig, n: int, clean: dict, adv: dict, perm: list[dict], out) -> dict[str, Any]:
    key = _metric_name(cfg.task)
    attacked = len(out.iters)
    return {"arch": cfg.model.arch, "task": cfg.task, "metric": key, "images": n, "attacked": attacked,
            "skipped_no_target": out.skipped_no_target, "clean": clean[key], "dag": adv[key],
            "perm": sum(p[key] for p in perm) / max(1, len(perm)), "perm_draws": [p[key] for p in perm],
            "p_mean": sum(out.p) / max(1, attacked), "iters_mean": sum(out.iters) / max(1, attacked),
            "converged": sum(out.converged) / max(1, attacked), "targets_mean": sum(out.targets) / max(1, attacked),
            "gamma_255": cfg.dag.gamma, "max_iters": cfg.dag.iters_for(cfg.task), "seconds": out.seconds,
            "active_curve": out.active_curve}


def dag_markdown(r: dict[str, Any]) -> str:
    name = "mIoU" if r["metric"] == "miou" else "mAP@0.5"
    return "\n".join([
        f"# DAG on {r['arch']} ({r['task']}, {r['images']} val images)", "",
        f"| {name} clean | DAG | PERM (mean of {len(r['perm_draws'])}) | p | iterations | all targets flipped |",
        "|---|---|---|---|---|---|",
        f"| {100 * r['clean']:.1f} | {100 * r['dag']:.1f} | {100 * r['perm']:.1f} | {r['p_mean']:.4f} | "
        f"{r['iters_mean']:.1f} of {r['max_iters']} | {100 * r['converged']:.0f}% |", "",
        f"gamma {r['gamma_255']}/255 per step; {r['attacked']} images attacked, {r['skipped_no_target']} without any "
        f"target skipped (r = 0 there, still scored); {r['targets_mean']:.0f} targets per image; p = sqrt(mean_k "
        "||r_k||^2) on [0, 1] RGB (thesis Sec 2.3.5).", ""])


def load_perturbation(path: str | Path) -> dict[str, Any]:
    """The perturbation file of ``path``: a run folder (its ``dag/``), a ``dag --out`` folder, or the file itself."""
    p = Path(path)
    if p.is_dir():
        p = next((c for c in (p / "dag" / PERTURBATIONS, p / PERTURBATIONS) if c.is_file()), p / "dag" / PERTURBATIONS)
    if not p.is_file():
        raise DatasetError(f"no perturbation file at {path}", f"run `atscale dense dag RUN` first; it writes "
                           f"RUN/dag/{PERTURBATIONS} (or --out DIR/{PERTURBATIONS})")
    return torch.load(p, map_location="cpu", weights_only=True)


def transfer(target: str | Path, sources: Sequence[str | Path], permute: bool = False, seed: int = 0,
             images: int = 0) -> dict:
    """The target run's metric on its val images plus the sum of the sources' perturbations (thesis Sec 2.4), on the
    first ``images`` (0 = every image all sources cover); ``sources`` empty: the clean metric on those images."""
    from atscale.attacks.dag import permuted
    from atscale.data.dense import dense_split
    from atscale.evaluation.dense_eval import score_perturbed
    from atscale.training.dense import load_dense_run

    device = _device()
    cfg, model = load_dense_run(target, device)
    parts = [load_perturbation(s) for s in sources]
    if not parts and images < 1:
        raise ConfigError("transfer needs at least one --perturbation (or --images N for the clean metric on the "
                          "first N images)", "pass a run folder or a perturbations.pt")
    for s, part in zip(sources, parts):
        if part["val"] != _val_identity(cfg):
            raise DatasetError(f"the perturbations of {s} were made on other val images ({part['val']}) than the "
                               f"target's ({_val_identity(cfg)})", "attack a run with the same data.* val settings")
    n = min([p["r"].shape[0] for p in parts] + ([images] if images > 0 else []))
    if images > n:
        raise ConfigError(f"--images {images} but the perturbations cover only {n} images", f"pass --images <= {n}")
    val = dense_split(cfg.data, cfg.task, "val")
    if n > len(val):
        raise ConfigError(f"--images {n} but the target has {len(val)} val images", f"pass --images <= {len(val)}")
    r = sum(p["r"][:n].float() for p in parts) if parts else None
    if permute and r is not None:
        r = permuted(r, torch.Generator().manual_seed(seed))
    out = score_perturbed(model, val, cfg.task, device, r, cfg.data.eval_batch_size, limit=n)
    key = _metric_name(cfg.task)
    res = {"target": cfg.model.arch, "task": cfg.task, "sources": [p["arch"] for p in parts], "permuted": permute,
           "images": n, key: out[key]}
    print(json.dumps(res))
    return res


def dense_cli(argv: Sequence[str]) -> int:
    """``atscale dense ...`` and ``python -m atscale.dense ...`` (the torchrun entry point)."""
    from atscale.cli_args import parse_dense

    a = parse_dense(argv)
    if a.action == "train":
        train(a.config, a.overrides)
    elif a.action == "eval":
        evaluate(a.run)
    elif a.action == "dag":
        dag(a.run, a.overrides, progress=not a.no_progress, out_dir=a.out)
    else:
        transfer(a.target, a.perturbation or [], a.permute, a.seed, a.images)
    return 0


__all__ = ["train", "evaluate", "dag", "transfer", "dense_cli", "dag_markdown", "load_perturbation", "PERTURBATIONS"]


if __name__ == "__main__":  # torchrun -m atscale.dense train --config ... (one process per GPU)
    import sys

    from atscale.errors import run_command

    sys.exit(run_command("atscale dense", lambda: dense_cli(sys.argv[1:])))
