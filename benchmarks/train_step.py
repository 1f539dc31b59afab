"""Throughput of one PGD-k adversarial training step (attack + Madry loss + backward + SGD), atscale vs plain PyTorch.

"ours" is what ``atscale.engine.train_one_epoch`` does per step: ``atscale.attacks.PGD`` (targeted, eps 16/255, step
1/255, clean start with p=0.2) under ``attack_mode`` (eval-mode BN, parameters frozen so only the input gradient is
computed), bf16 autocast on CUDA, channels_last model and inputs, normalization inside the model, Nesterov SGD.
"plain" is the common naive loop: a bare ``timm.create_model`` in fp32 and contiguous format, manual (x - mean) / std,
train mode during the attack, ``loss.backward()`` on every PGD step (gradients for all parameters, then zeroed),
random start, same k / eps / step, then an fp32 training step.

Both run in the same process on the same synthetic batch (random uint8 images made on the device, scaled to [0, 1]).
Prints one JSON object (median seconds per step, images/s, ours/plain ratio, peak CUDA memory, device info, args).

    python benchmarks/train_step.py --model resnet18 --batch 32 --image-size 64 --attack-steps 3 \
        --save benchmarks/results/cpu_resnet18_64px_pgd3.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

try:
    import atscale.models  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from atscale.attacks.pgd import PGD
from atscale.config import PerfCfg
from atscale.distributed.updater import DDPUpdater
from atscale.layers.checkpointing import enable_activation_checkpointing
from atscale.models.factory import create_model
from atscale.training.objectives import Madry
from atscale.training.optim import param_groups, use_fused
from atscale.runtime import compile_model, set_backend_flags
from atscale.training.loop import train_step

EPS, STEP = 16 / 255, 1 / 255
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50", help="timm architecture name")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--attack-steps", type=int, default=3, help="PGD iterations k")
    p.add_argument("--iters", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto", help="ours only; auto = bf16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    p.add_argument("--which", choices=["both", "ours", "plain"], default="both")
    p.add_argument("--compile", default="off", help="ours: perf.compile mode (off, default, reduce-overhead, ...)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto", help="ours: perf.fused_optimizer")
    p.add_argument("--checkpointing", choices=["off", "update", "all"], default="off",
                   help="ours: perf.activation_checkpointing")
    p.add_argument("--no-channels-last", action="store_true", help="ours: model.channels_last off")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one step of ours (torch.profiler) and keep the N most expensive ops")
    p.add_argument("--ablate", action="store_true",
                   help="also time ours with each switch flipped (amp, channels_last, fused, compile, checkpointing)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict passed to timm.create_model")
    p.add_argument("--save", default=None, help="also write the JSON to this path")
    args = p.parse_args(argv)
    args.model_kwargs = json.loads(args.model_kwargs)
    if not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs must be a JSON object")
    if (args.ablate or args.profile) and args.which == "plain":
        p.error("--ablate / --profile vary ours: use --which both or ours")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0 or args.attack_steps < 1:
        p.error("need --batch >= 1, --iters >= 1, --warmup >= 0, --attack-steps >= 1")
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit(out: dict, save: str | None) -> dict:
    """Print the benchmark's JSON record and, with ``--save PATH``, also write it there (benchmarks/results/)."""
    text = json.dumps(out, indent=2)
    print(text)
    if save:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"wrote {path}")
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, 3, args.image_size, args.image_size)
    x = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8).float().div_(255)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g, device=device)
    return x, y


@dataclass(frozen=True)
class Switches:
    """The ``perf`` / ``run.amp`` / ``model.channels_last`` settings of one "ours" variant."""

    amp_dtype: torch.dtype | None
    channels_last: bool = True
    compile: str = "off"
    fused: bool = False
    checkpointing: str = "off"  # off | update | all

    def describe(self) -> dict[str, Any]:
        return {"amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                "channels_last": self.channels_last, "compile": self.compile, "fused_optimizer": self.fused,
                "activation_checkpointing": self.checkpointing}


def ablations(base: Switches) -> dict[str, Switches]:
    """``base`` with one switch flipped at a time (amp only where bf16 is on: bf16 on CPU is emulated, not a speedup)."""
    out = {"channels_last": replace(base, channels_last=not base.channels_last),
           "fused_optimizer": replace(base, fused=not base.fused),
           "compile": replace(base, compile="off" if base.compile != "off" else "default"),
           "activation_checkpointing": replace(base, checkpointing="all" if base.checkpointing == "off" else "off")}
    if base.amp_dtype is not None:
        out["amp"] = replace(base, amp_dtype=None)
    return out


def build_ours(args: argparse.Namespace, device: torch.device, sw: Switches,
               x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    torch.manual_seed(0)
    amp_dtype = sw.amp_dtype
    model = create_model(args.model, args.num_classes, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                         args.model_kwargs, channels_last=sw.channels_last).to(device)
    if sw.checkpointing != "off":
        enable_activation_checkpointing(model, attack=sw.checkpointing == "all")
    compile_model(model, sw.compile)
    model.train()
    x = x.contiguous(memory_format=torch.channels_last if sw.channels_last else torch.contiguous_format)
    attack = PGD(EPS, STEP, args.attack_steps, targeted=True, clean_start_prob=0.2, amp_dtype=amp_dtype)
    objective = Madry()
    opt = torch.optim.SGD(param_groups(model, WEIGHT_DECAY, False), lr=LR, momentum=MOMENTUM, nesterov=True,
                          fused=True if sw.fused else None)

    updater = DDPUpdater(model, opt, device, accum=1, amp_dtype=amp_dtype)

    def step() -> float:  # the step `atscale train` runs (atscale.training.loop.train_step)
        return train_step(updater, attack, objective, x, y, amp_dtype=amp_dtype).loss.item()

    return step


def build_plain(args: argparse.Namespace, device: torch.device,
                x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **args.model_kwargs)
    model = model.to(device)
    model.train()
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)

    def pgd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model((x_adv - mean) / std), y)
            loss.backward()
            grad = x_adv.grad
            model.zero_grad()
            x_adv = x_adv.detach() + STEP * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
        return x_adv.detach()

    def step() -> float:
        x_adv = pgd(x, y)
        loss = F.cross_entropy(model((x_adv - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def measure(name: str, make: Callable[[], Callable[[], float]], args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make()
    for i in range(args.warmup):
        t = time.perf_counter()
        step()
        sync(device)
        log(f"[{name}] warmup {i + 1}/{args.warmup}: {time.perf_counter() - t:.3f}s")
    times, losses = [], []
    for i in range(args.iters):
        sync(device)
        t = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t)
        log(f"[{name}] step {i + 1}/{args.iters}: {times[-1]:.3f}s loss {losses[-1]:.3f}")
    med = statistics.median(times)
    res: dict[str, Any] = {"median_s_per_step": med, "img_per_s": args.batch / med, "min_s": min(times),
                           "max_s": max(times), "step_times_s": times, "last_loss": losses[-1]}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del step
    return res


def profile_step(step: Callable[[], float], device: torch.device, top: int) -> dict[str, Any]:
    """One profiled step after the timed ones: the ``top`` ops by self time, and the share of the step they take."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # warm: autotuning, compilation, allocator
    sync(device)
    with profile(activities=acts) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return {"sorted_by": key, "total_ms": total / 1e3,
            "top": [{"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
                    for e in events[:top]]}


def setup_device(name: str, threads: int) -> torch.device:
    """torch's CPU threads (0 = its default), the device (``auto`` = CUDA when present) and the backend flags a run
    sets by default (``perf.cudnn_benchmark``, ``perf.tf32``; both loops get them)."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    set_backend_flags(PerfCfg(), device)
    return device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup_device(args.device, args.threads)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    sw = Switches(amp_dtype, channels_last=not args.no_channels_last, compile=args.compile,
                  fused=use_fused(args.fused, "sgd", device), checkpointing=args.checkpointing)
    x, y = synthetic_batch(args, device)
    log(f"{args.model} batch {args.batch} {args.image_size}px PGD-{args.attack_steps} on {device} "
        f"({torch.get_num_threads()} threads), ours {sw.describe()}")

    out: dict[str, Any] = {
        "benchmark": "train_step", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "data": "synthetic", "device": device_info(device), "loadavg_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "setup": {"eps": EPS * 255, "step": STEP * 255, "attack_steps": args.attack_steps,
                  "ours": {**sw.describe(), "attack_bn": "eval", "attack_param_grads": False,
                           "targeted": True, "clean_start_prob": 0.2},
                  "plain": {"amp_dtype": "fp32", "channels_last": False, "attack_bn": "train",
                            "attack_param_grads": True, "targeted": False, "clean_start_prob": 0.0}},
    }
    if args.which in ("both", "ours"):
        out["ours"] = measure("ours", lambda: build_ours(args, device, sw, x, y), args, device)
        if args.profile:
            out["ours"]["profile"] = profile_step(build_ours(args, device, sw, x, y), device, args.profile)
    if args.ablate:
        out["ablations"] = {}
        for name, variant in ablations(sw).items():
            res = measure(f"ours {name} flipped", lambda: build_ours(args, device, variant, x, y), args, device)
            res.update(switches=variant.describe(), ours_over_this=out["ours"]["img_per_s"] / res["img_per_s"])
            out["ablations"][name] = res
    if args.which in ("both", "plain"):
        out["plain"] = measure("plain", lambda: build_plain(args, device, x, y), args, device)
    out["loadavg_end"] = os.getloadavg()
    if "ours" in out and "plain" in out:
        out["ratio"] = out["ours"]["img_per_s"] / out["plain"]["img_per_s"]
    return emit(out, args.save)


if __name__ == "__main__":
    main()
