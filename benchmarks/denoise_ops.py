"""Cost of one feature-denoising block (Xie thesis Sec 4.4) vs one ResNet bottleneck block of the same stage.

For each denoising op (gaussian with the fused attention kernel, gaussian as an explicit softmax matrix as the original
TensorFlow code, gaussian with 2x2 subsampling of the x_j, dot, bilateral_gaussian, bilateral_dot, mean, median, null) and each stage shape of ResNet-152 at 224 px (res3: 512 ch x 28x28, res4: 1024 ch x 14x14), times
forward + backward (gradients for the input and all parameters, BN in train mode) of an ``atscale.layers.denoise.
DenoiseBlock`` and of timm's ``Bottleneck`` with the same input/output channels (planes = C/4, what R-152 stacks in that
stage), on one synthetic batch; reports median seconds, the denoise/bottleneck time ratio and parameter counts.
Channels_last; bf16 autocast on CUDA by default (``--amp``), fp32 on CPU. Prints one JSON object.

    python benchmarks/denoise_ops.py                                   # CPU, batch 8, about a minute on 2 cores
    python benchmarks/denoise_ops.py --device cuda --batch 32 --save benchmarks/results/h100_denoise_ops.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

try:
    import atscale.models  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
from timm.models.resnet import Bottleneck
from torch import nn

from atscale.layers.denoise import DenoiseBlock
from train_step import device_info, emit, sync  # benchmarks/ shares the device record

STAGES = {"res2": (256, 56), "res3": (512, 28), "res4": (1024, 14), "res5": (2048, 7)}
OPS = {"gaussian": {"op": "gaussian"}, "gaussian_explicit": {"op": "gaussian", "fused": False},
       "gaussian+subsample": {"op": "gaussian", "subsample": True},
       "dot": {"op": "dot"}, "bilateral_gaussian": {"op": "bilateral_gaussian"},
       "bilateral_dot": {"op": "bilateral_dot"}, "mean": {"op": "mean"}, "median": {"op": "median"},
       "null": {"op": "null"}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=["res3", "res4"])
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, none (fp32) on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--save", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error("need --batch >= 1, --iters >= 1, --warmup >= 0")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
            amp: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with amp():
            y = module(x)
        y.backward(grad.to(y.dtype))
    return step


def measure_stage(stage: str, modules: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace,
                  device: torch.device, amp: Callable[[], contextlib.AbstractContextManager]) -> dict[str, dict]:
    """Round-robin timing: each round runs every module once, so load changes on a shared machine hit all alike."""
    grad = torch.randn_like(x)
    steps = {}
    for name, module in modules.items():
        modules[name] = module.to(device, memory_format=torch.channels_last).train()
        steps[name] = fwd_bwd(modules[name], x, grad, amp)
    times: dict[str, list[float]] = {name: [] for name in modules}
    peak: dict[str, float] = {}
    for r in range(args.warmup + args.iters):
        for name, step in steps.items():
            if device.type == "cuda" and r == 0:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
            if device.type == "cuda" and r == 0:
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    out = {}
    for name, ts in times.items():
        res: dict[str, Any] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                               "params": n_params(modules[name])}
        if name in peak:
            res["peak_mem_gib"] = peak[name]
        log(f"[{stage} {name}] {res['median_s'] * 1e3:.1f} ms (min {res['min_s'] * 1e3:.1f}, "
            f"max {res['max_s'] * 1e3:.1f})")
        out[name] = res
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    log(f"denoise blocks vs bottleneck, batch {args.batch} on {device} ({torch.get_num_threads()} threads), "
        f"amp={amp_dtype}")
    out: dict[str, Any] = {
        "benchmark": "denoise_ops", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "data": "synthetic", "device": device_info(device), "loadavg_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "setup": {"timed": "forward + backward (input and parameter grads), train-mode BN, channels_last; rounds run "
                           "every module once (round-robin), median over the timed rounds",
                  "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                  "baseline": "timm Bottleneck(inplanes=C, planes=C/4)", "ratio": "denoise median_s / bottleneck"},
        "stages": {},
    }
    for stage in args.stages:
        ch, size = STAGES[stage]
        torch.manual_seed(0)
        x = torch.randn(args.batch, ch, size, size, device=device).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        modules: dict[str, nn.Module] = {"bottleneck": Bottleneck(ch, ch // 4)}
        modules.update({name: DenoiseBlock(ch, **OPS[name]) for name in args.ops})
        timed = measure_stage(stage, modules, x, args, device, amp)
        base = timed.pop("bottleneck")
        for r in timed.values():
            r["ratio"] = r["median_s"] / base["median_s"]
        out["stages"][stage] = {"shape": list(x.shape), "bottleneck": base, "denoise": timed}
        del modules, x
    out["loadavg_end"] = os.getloadavg()
    out["summary_ratio"] = {stage: {k: round(v["ratio"], 3) for k, v in r["denoise"].items()}
                            for stage, r in out["stages"].items()}
    return emit(out, args.save)


if __name__ == "__main__":
    main()
