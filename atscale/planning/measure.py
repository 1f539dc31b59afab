"""``atscale plan --measure`` (:mod:`atscale.planning`): time a few real training steps of each phase on this machine
and set the images/s against the counted FLOPs per image (:mod:`atscale.planning.flops`): the achieved TFLOP/s, and
the MFU where the device is one of :data:`atscale.planning.gpus.GPU_KINDS`.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from atscale.config import Config
from atscale.planning.flops import (phase_attack, phase_model, phase_objective, probe_batch, stochastic_attack,
                                    synthetic_batch)
from atscale.planning.gpus import GPU_KINDS, kind_of_device, peak_for
from atscale.planning.phases import PhaseCost, PhaseSpec, num_classes


def measure_phase(cfg: Config, spec: PhaseSpec, batch: int = 0, steps: int = 3) -> dict[str, Any]:
    """Time ``steps`` real training steps (after one untimed) of ``spec`` on this machine (``run.device``; amp,
    channels_last and the optimizer as the run has them; synthetic [0, 1] images, no torch.compile): images/s and
    the FLOP/s it implies. ``batch`` 0 = the phase's per-GPU batch on CUDA, 2 on CPU."""
    import torch

    from atscale.distributed import resolve_device
    from atscale.distributed.updater import DDPUpdater
    from atscale.runtime import resolve_amp, set_backend_flags
    from atscale.training.loop import train_step
    from atscale.training.optim import build_optimizer, use_fused

    device = resolve_device(cfg.run.device)
    set_backend_flags(cfg.perf, device)
    amp = resolve_amp(cfg.run.amp, device)
    n = batch or (spec.batch_size if device.type == "cuda" else max(2, probe_batch(cfg)))
    model, attack = phase_model(cfg, spec, device), phase_attack(cfg, spec, spec.attack_iters, amp, cfg.run.seed)
    objective, augment = phase_objective(cfg, cfg.run.seed)
    fused = use_fused(cfg.perf.fused_optimizer, cfg.optim.name, device, cfg.dist.engine)
    updater = DDPUpdater(model, build_optimizer(model, cfg.optim, n, fused), device, accum=1, amp_dtype=amp)
    x, y = synthetic_batch(cfg, n, spec.image_size, device, num_classes(cfg))

    def step() -> None:
        xb = augment(x) if augment is not None else x
        for _ in range(objective.replays):
            train_step(updater, attack, objective, xb, y, amp_dtype=amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "amp": str(amp).replace("torch.", "") if amp else "fp32", "batch": n, "steps": steps,
            "seconds_per_step": statistics.median(times), "images_per_s": n / statistics.median(times)}


def measured_row(cfg: Config, cost: PhaseCost, batch: int, steps: int) -> dict[str, Any]:
    """One phase measured (:func:`measure_phase`, ``attack.stochastic_layers`` as the run sets it), with its
    achieved TFLOP/s and, on a known GPU kind, its MFU."""
    with stochastic_attack(cfg.attack.stochastic_layers):
        m = measure_phase(cfg, cost.spec, batch, steps)
    m["achieved_tflops"] = m["images_per_s"] * cost.per_image / 1e12
    key = kind_of_device(m["device"])
    if key is not None:
        m["gpu_kind"], m["mfu"] = key, m["achieved_tflops"] / peak_for(GPU_KINDS[key], cfg)[0]
    return {"phase": cost.spec.index, **m}
