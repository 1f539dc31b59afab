"""The plan of ``atscale plan`` (:mod:`atscale.planning`): for each phase its counted FLOPs per image
(:mod:`atscale.planning.flops`) times the images it trains on (:mod:`atscale.planning.phases`); per GPU kind the
images/s, GPU-hours and wall time at the MFU (:mod:`atscale.planning.gpus`); the paper's published cost where one is
known; ``--measure`` rows (:mod:`atscale.planning.measure`); as a JSON-able dict and as text.

Wall time on N GPUs assumes linear scaling (no communication, input-pipeline or evaluation time).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from atscale.config import Config
from atscale.errors import ConfigError
from atscale.planning.flops import COUNTER, count_phase
from atscale.planning.gpus import (DEFAULT_MFU, DEFAULT_MFU_SOURCE, GPU_KINDS, PUBLISHED_COSTS, check_kinds,
                                   measured_mfu, peak_for)
from atscale.planning.measure import measured_row
from atscale.planning.phases import PhaseCost, dataset_images, epoch_images, phases_of

DEFAULT_GPUS = 8
SCALING = "linear in the GPU count: no communication, data-loading, evaluation or checkpoint time"


def _phase_row(cost: PhaseCost, images: int, gpus: int, accum: int) -> dict[str, Any]:
    s = cost.spec
    seen = epoch_images(images, s, gpus, accum)
    g = 1e-9
    return {"index": s.index, "epochs": [s.start, s.end], "image_size": s.image_size, "batch_size_per_gpu":
            s.batch_size, "attack_iters": s.attack_iters, "attack_eps": s.attack_eps, "token_drop": s.token_drop,
            "forward_gflops": cost.forward * g, "attack_step_gflops": cost.attack_step * g,
            "attack_fixed_gflops": cost.attack_fixed * g, "attack_gflops": cost.attack * g,
            "update_gflops": cost.update * g, "replays": cost.replays, "gflops_per_image": cost.per_image * g,
            "forward_equivalents": cost.per_image / cost.forward, "images_per_epoch": seen,
            "optimizer_steps": s.epochs * seen // (s.batch_size * gpus * accum) * cost.replays,
            "flops": s.epochs * seen * cost.per_image, "counted_on": cost.counted_on}


def _kind_row(key: str, cfg: Config, rows: list[dict[str, Any]], gpus: int, mfu: float) -> dict[str, Any]:
    kind = GPU_KINDS[key]
    peak, precision = peak_for(kind, cfg)
    rate = mfu * peak * 1e12
    seconds = sum(r["flops"] for r in rows) / rate
    return {"kind": key, "name": kind.name, "precision": precision, "peak_tflops": peak, "peak_source": kind.source,
            "images_per_s_per_gpu": [rate / (r["gflops_per_image"] * 1e9) for r in rows],
            "gpu_hours": seconds / 3600, "wall_hours": seconds / 3600 / gpus}


def _published(name: str, total_flops: float, cfg: Config, mfu: float) -> dict[str, Any] | None:
    pub = PUBLISHED_COSTS.get(name)
    if pub is None:
        return None
    kind = GPU_KINDS[pub.gpu_kind]
    peak = kind.half if pub.precision == "half" else kind.fp32
    projected = total_flops / (mfu * peak_for(kind, cfg)[0] * 1e12) / 3600
    return {**asdict(pub), "gpu_hours": pub.gpus * pub.hours, "peak_tflops_of_its_precision": peak,
            "implied_mfu": total_flops / (pub.gpus * pub.hours * 3600 * peak * 1e12),
            "projected_gpu_hours_same_kind": projected, "projected_wall_hours_same_gpus": projected / pub.gpus}


def plan(cfg: Config, gpus: int = DEFAULT_GPUS, kinds: list[str] | None = None, mfu: float | None = None,
         images: int | None = None, measure: bool = False, measure_batch: int = 0, measure_steps: int = 3,
         config_path: str = "") -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs of each of ``kinds`` (all when empty) as a JSON-able dict."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} is not a GPU count", "give --gpus 1 or more")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is not a utilization", "give a fraction in (0, 1], e.g. --mfu 0.35")
    kinds = check_kinds(list(kinds or []))
    n, n_source = dataset_images(cfg, images)
    if n < 1:
        raise ConfigError(f"--images {n} is not a dataset size", "give --images 1 or more")
    mfu_value, mfu_source = (mfu, "--mfu") if mfu is not None else (measured_mfu(cfg.model.arch) or
                                                                    (DEFAULT_MFU, DEFAULT_MFU_SOURCE))
    specs = phases_of(cfg)
    for s in specs:  # a phase without a full batch fails before any counting
        epoch_images(n, s, gpus, cfg.dist.grad_accum)
    costs = [count_phase(cfg, s) for s in specs]
    rows = [_phase_row(c, n, gpus, cfg.dist.grad_accum) for c in costs]
    total = sum(r["flops"] for r in rows)
    out = {"preset": cfg.run.name, "config": config_path, "model": cfg.model.arch, "objective": cfg.objective.name,
           "attack": cfg.attack.name, "epochs": cfg.schedule.epochs, "dataset_images": n, "dataset_source": n_source,
           "gpus": gpus, "grad_accum": cfg.dist.grad_accum, "scaling": SCALING, "mfu": mfu_value,
           "mfu_source": mfu_source, "counter": COUNTER, "phases": rows, "total_flops": total,
           "gpu_kinds": [_kind_row(k, cfg, rows, gpus, mfu_value) for k in kinds],
           "published": _published(cfg.run.name, total, cfg, mfu_value), "measured": None}
    if measure:
        out["measured"] = [measured_row(cfg, c, measure_batch, measure_steps) for c in costs]
    return out


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.2g} s"
    return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} d)"


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_plan(p: dict[str, Any]) -> str:
    """The plan as text: the phases' FLOPs, then one line per GPU kind, the published cost and any measurement."""
    lines = [f"atscale plan: {p['preset']} ({p['config'] or 'config'}): {p['model']}, objective {p['objective']}, "
             f"attack {p['attack']}, {p['epochs']} epochs of {p['dataset_images']:,} images ({p['dataset_source']})",
             ""]
    head = ["phase", "epochs", "px", "batch/GPU", "attack iters", "fwd GFLOP", "attack", "update", "per image",
            "x fwd"]
    lines += _table([head] + [[str(r["index"]), f"{r['epochs'][0]}-{r['epochs'][1]}", str(r["image_size"]),
                               str(r["batch_size_per_gpu"]), str(r["attack_iters"]), f"{r['forward_gflops']:.3g}",
                               f"{r['attack_gflops']:.4g}", f"{r['update_gflops']:.4g}",
                               f"{r['gflops_per_image']:.4g}", f"{r['forward_equivalents']:.1f}"]
                              for r in p["phases"]])
    lines += ["", f"total {p['total_flops']:.3g} FLOPs ({p['counter']})",
              f"MFU {p['mfu']:.2f} ({p['mfu_source']}); wall time on {_gpus(p['gpus'])}, {p['scaling']}", ""]
    head = ["GPU", "precision", "peak TFLOP/s", "img/s/GPU per phase", "GPU-hours", f"wall on {_gpus(p['gpus'])}"]
    lines += _table([head] + [[k["name"], k["precision"], f"{k['peak_tflops']:g}",
                               " / ".join(f"{v:,.0f}" if v >= 10 else f"{v:.2g}" for v in k["images_per_s_per_gpu"]),
                               f"{k['gpu_hours']:,.0f}" if k["gpu_hours"] >= 10 else f"{k['gpu_hours']:.2g}",
                               _hours(k["wall_hours"])] for k in p["gpu_kinds"]])
    pub = p["published"]
    if pub:
        kind = GPU_KINDS[pub["gpu_kind"]].name
        lines += ["", f"published: {pub['hours']:g} h on {pub['gpus']} {kind} = {pub['gpu_hours']:,.0f} GPU-hours "
                      f"({pub['precision']}); the FLOPs counted here imply MFU {pub['implied_mfu']:.2f} of its "
                      f"{pub['peak_tflops_of_its_precision']:g} TFLOP/s peak; this plan on {pub['gpus']} {kind} at MFU "
                      f"{p['mfu']:.2f}: {_hours(pub['projected_wall_hours_same_gpus'])}",
                  f"  source: {pub['source']}"]
    for m in p["measured"] or []:
        extra = f", MFU {m['mfu']:.2f} of {m['gpu_kind']}" if "mfu" in m else ""
        lines.append(f"measured phase {m['phase']} on {m['device']} ({m['amp']}, batch {m['batch']}): "
                     f"{m['images_per_s']:.3g} img/s, {m['achieved_tflops']:.3g} TFLOP/s{extra}")
    return "\n".join(lines)


def run_plan(config: str, overrides: list[str], gpus: int = DEFAULT_GPUS, kinds: list[str] | None = None,
             mfu: float | None = None, images: int | None = None, measure: bool = False, measure_batch: int = 0,
             measure_steps: int = 3, as_json: bool = False) -> int:
    """``atscale plan``: load ``config`` with ``overrides``, print the plan (text or JSON); returns 0."""
    from atscale.config import load_config

    check_kinds(list(kinds or []))
    cfg = load_config(config, overrides)
    p = plan(cfg, gpus, kinds, mfu, images, measure, measure_batch, measure_steps, config)
    print(json.dumps(p, indent=1) if as_json else format_plan(p))
    return 0
