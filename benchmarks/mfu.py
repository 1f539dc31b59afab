"""Training-step images/s and model FLOP utilisation (MFU) of PGD-k adversarial training, atscale vs plain PyTorch.

For each model x k (``--models`` x ``--attack-steps``) this times one full training step, "ours" and "plain" exactly as
``benchmarks/train_step.py`` defines them (ours: eval-mode BN and frozen parameters during the attack, bf16 autocast on
CUDA / fp32 on CPU, channels_last, fused SGD on CUDA, optional ``torch.compile``; plain: fp32, contiguous format,
``loss.backward()`` over all parameters on every PGD step), side by side in one process on the same synthetic batch.

Cost model: one forward pass is F FLOPs per image; a PGD step is a forward plus an input-only backward (2F), the weight
update a forward plus a full backward (3F), so a PGD-k training step costs (2k+3) F per image, and

    MFU = (2k + 3) x F x images/s / peak FLOP/s

F (``fwd_gflops_per_image``) is counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eval-mode, no_grad
forward of the atscale model at ``--image-size`` (conv / matmul / attention FLOPs, 2 per multiply-add; elementwise ops,
BN and softmax are not counted). Both loops are charged (2k+3) F: that is the model's useful work; the plain loop's
attack backward also computes weight gradients, so it actually performs (3k+3) F of arithmetic.

The peak is the dense bf16 tensor-core peak of the GPU (table ``GPU_PEAK_TFLOPS``, by name), also for the fp32 plain
loop ("MFU against the device's dense bf16 peak"); an unknown GPU gets a measured bf16 matmul peak. A CPU has no
published peak, so the best rate of two fp32 kernels in this process at its thread count is used: ten 2048x2048
``torch.mm`` and ten 3x3 convolutions through oneDNN (about twice the matmul's rate on this project's CPU machine),
measured before and after the rows (the higher is kept). ``--peak-tflops`` overrides either.

Why it matters: adversarial training multiplies the cost of a step by (2k+3)/3; the baseline ResNet-152 PGD-30 model of the
Feature Denoising work took 52 hours on 128 V100 GPUs (Xie thesis Sec 4.5; its denoise model about 90, by the
ImageNet-Adversarial-Training instructions).

    python benchmarks/mfu.py --save benchmarks/results/h100_mfu.json                     # defaults: 5 models x k=1,3,10
    python benchmarks/mfu.py --models resnet50 --attack-steps 1,3,10 --batch 256 --compile default
    python benchmarks/mfu.py --batch 16 --image-size 64 --iters 3 --warmup 1 --threads 2 \\
        --save benchmarks/results/cpu-2core_mfu_64px.json
    python benchmarks/mfu.py --flops-only --models resnet152,resnet152_denoise,resnet50,resnet50_denoise \\
        --save benchmarks/results/flops_224px.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from atscale.models.factory import create_model  # noqa: E402
from atscale.training.optim import use_fused  # noqa: E402
from train_step import (Switches, build_ours, build_plain, device_info, emit, log, measure,  # noqa: E402
                        setup_device, synthetic_batch, sync)

DEFAULT_MODELS = "resnet50,resnet152,resnet152_denoise,resnext101_32x8d,efficientnet_b0"
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name; first match wins
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0),
    ("V100", 125.0),  # fp16 tensor cores: V100 has no bf16
)
GPU_TARGETS = {1: 4000.0, 3: 2400.0, 10: 950.0}  # ResNet-50, 224 px, ours img/s per PGD-k (the issue's targets)
GPU_RATIO_TARGET, CPU_RATIO_TARGET, DENOISE_COST_TARGET = 2.5, 1.4, 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma list of timm / atscale architectures")
    p.add_argument("--attack-steps", default="1,3,10", help="comma list of PGD iterations k")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=10, help="timed training steps per variant and row")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per variant and row")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    p.add_argument("--which", choices=["both", "ours", "plain"], default="both")
    p.add_argument("--compile", default="off", help="ours: perf.compile mode (off, default, reduce-overhead, ...)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak in TFLOP/s (overrides table/measure)")
    p.add_argument("--targets", action=argparse.BooleanOptionalAction, default=True,
                   help="record the issue's throughput targets (met or not) under 'targets'")
    p.add_argument("--flops-only", action="store_true",
                   help="only count forward FLOPs (meta device, no timing); denoise models also with key subsampling")
    p.add_argument("--save", default=None, help="also write the JSON to this path")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.attack_steps = [int(k) for k in args.attack_steps.split(",") if k.strip()]
    if args.batch < 1 or args.iters < 1 or args.warmup < 0 or not args.attack_steps or min(args.attack_steps) < 1:
        p.error("need --batch >= 1, --iters >= 1, --warmup >= 0, --attack-steps >= 1")
    return args


def forward_gflops(model_name: str, image_size: int, num_classes: int, device: torch.device,
                   kwargs: dict[str, Any] | None = None) -> tuple[float, str]:
    """F per image in GFLOPs (2 per multiply-add), one eval forward of batch 2; on the meta device (no compute) unless
    the model cannot run there. Returns (gflops, where it was counted)."""
    for where in ("meta", device.type):
        try:
            with torch.device(where):
                model = create_model(model_name, num_classes, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                     kwargs or {}, channels_last=True).eval()
                x = torch.rand(2, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(x)
            return counter.get_total_flops() / 2 / 1e9, where
        except Exception as e:  # noqa: BLE001  (an op without a meta kernel, data-dependent code)
            if where != "meta":
                raise
            log(f"{model_name}: FLOP count on meta failed ({e}); counting on {device.type}")
    raise AssertionError("unreachable")


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best of ``reps`` n x n x n ``torch.mm`` runs (after a warm-up) in TFLOP/s."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def conv_tflops(device: torch.device, reps: int = 10) -> float:
    """Best of ``reps`` fp32 3x3 convolutions (16 x 256 x 16 x 16, channels_last, no grad) in TFLOP/s: on CPU oneDNN's
    convolution kernels run at about twice the rate of torch's fp32 ``mm``, so a matmul alone understates the peak."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(16, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * 16 * 256 * 256 * 9 * 16 * 16 / best / 1e12


def cpu_peak(device: torch.device) -> float:
    return max(matmul_tflops(device, torch.float32), conv_tflops(device))


def device_peak(device: torch.device, override: float | None) -> dict[str, Any]:
    if override is not None:
        return {"peak_tflops": override, "peak_source": "--peak-tflops"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return {"peak_tflops": tflops, "peak_source": f"published dense {'fp16' if key == 'V100' else 'bf16'}"
                        f" tensor-core peak of '{key}'"}
        return {"peak_tflops": matmul_tflops(device, torch.bfloat16, n=8192, reps=10),
                "peak_source": f"measured bf16 matmul ('{name}' is not in the table)"}
    return {"peak_tflops": cpu_peak(device), "peak_source": "measured: best of fp32 2048^3 matmul and fp32 3x3 conv",
            "peak_threads": torch.get_num_threads()}


def remeasure_peak(peak: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A measured peak is taken again after the rows and the higher one kept: on a shared machine one measurement can
    fall on a busy moment and make every MFU look too good."""
    if not peak["peak_source"].startswith("measured"):
        return peak
    again = cpu_peak(device) if device.type == "cpu" else matmul_tflops(device, torch.bfloat16, n=8192)
    return {**peak, "peak_tflops_start": peak["peak_tflops"], "peak_tflops_end": again,
            "peak_tflops": max(peak["peak_tflops"], again)}


def add_mfu(row: dict[str, Any], peak_tflops: float) -> None:
    for name in ("ours", "plain"):
        if "img_per_s" in row.get(name, {}):
            row[name]["mfu"] = row["flops_per_image_step"] * row[name]["img_per_s"] / (peak_tflops * 1e12)


def run_row(args: argparse.Namespace, device: torch.device, sw: Switches, model: str, k: int,
            gflops: float) -> dict[str, Any]:
    ns = argparse.Namespace(model=model, batch=args.batch, image_size=args.image_size, num_classes=args.num_classes,
                            attack_steps=k, iters=args.iters, warmup=args.warmup, model_kwargs={})
    row: dict[str, Any] = {"model": model, "attack_steps": k, "batch": args.batch, "image_size": args.image_size,
                           "fwd_gflops_per_image": gflops, "flops_per_image_step": (2 * k + 3) * gflops * 1e9,
                           "loadavg_start": os.getloadavg()}
    x, y = synthetic_batch(ns, device)
    builders = {"ours": lambda: build_ours(ns, device, sw, x, y), "plain": lambda: build_plain(ns, device, x, y)}
    for name, make in builders.items():
        if args.which not in ("both", name):
            continue
        try:
            res = measure(f"{model} PGD-{k} {name}", make, ns, device)
            res["ms_per_step"] = res["median_s_per_step"] * 1e3
            row[name] = res
        except Exception as e:  # noqa: BLE001  (CUDA OOM, a model the plain loop cannot build, ...): keep going
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            log(f"[{model} PGD-{k} {name}] failed: {row[name]['error']}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "img_per_s" in row.get("ours", {}) and "img_per_s" in row.get("plain", {}):
        row["ratio"] = row["ours"]["img_per_s"] / row["plain"]["img_per_s"]
    return row


def target(measured: float | None, threshold: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = None if measured is None else (measured >= threshold if higher_is_better else measured <= threshold)
    return {"measured": measured, "threshold": threshold, "met": met}


def check_targets(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    get = {(r["model"], r["attack_steps"]): r for r in rows}
    ips = lambda r, v: r.get(v, {}).get("img_per_s")  # noqa: E731
    out: dict[str, Any] = {}
    if device.type == "cuda":
        if args.image_size != 224:
            out["note"] = "the GPU throughput targets are for ResNet-50 at 224 px; not checked at this image size"
        else:
            for k, thr in GPU_TARGETS.items():
                if ("resnet50", k) in get:
                    r = get[("resnet50", k)]
                    out[f"resnet50_pgd{k}_ours_img_per_s"] = target(ips(r, "ours"), thr)
                    out[f"resnet50_pgd{k}_ours_over_plain"] = target(r.get("ratio"), GPU_RATIO_TARGET)
    else:
        for (model, k), r in get.items():
            if k == 3:
                out[f"{model}_pgd3_cpu_ours_over_plain"] = target(r.get("ratio"), CPU_RATIO_TARGET)
    for k in args.attack_steps:
        den, base = get.get(("resnet152_denoise", k)), get.get(("resnet152", k))
        if den and base:
            a, b = den.get("ours", {}).get("median_s_per_step"), base.get("ours", {}).get("median_s_per_step")
            out[f"resnet152_denoise_over_resnet152_pgd{k}_ours_step_time"] = target(
                a / b if a and b else None, DENOISE_COST_TARGET, higher_is_better=False)
    return out


def table_md(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | k | fwd GFLOPs | ours img/s | plain img/s | ours/plain | ours MFU % | plain MFU % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r.get("ours", {}), r.get("plain", {})
        lines.append(f"| {r['model']} | {r['attack_steps']} | {r['fwd_gflops_per_image']:.3g} | "
                     f"{f(o.get('img_per_s'), '.1f') if 'error' not in o else 'error'} | "
                     f"{f(p.get('img_per_s'), '.1f') if 'error' not in p else 'error'} | {f(r.get('ratio'), '.2f')} | "
                     f"{f(o.get('mfu') and 100 * o['mfu'], '.1f')} | {f(p.get('mfu') and 100 * p['mfu'], '.1f')} |")
    return "\n".join(lines)


def count_only(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward GFLOPs per image of each model (and of each denoise model with 2x2 key subsampling, Xie thesis Sec
    4.6.2), with each model's ratio to the first model listed: the arithmetic floor of a step-time ratio."""
    from atscale.models.registry import DENOISE_MODELS

    rows = []
    for model in args.models:
        for kwargs in ([{}, {"denoise_subsample": True}] if model in DENOISE_MODELS else [{}]):
            gflops, where = forward_gflops(model, args.image_size, args.num_classes, device, kwargs)
            rows.append({"model": model, "kwargs": kwargs, "fwd_gflops_per_image": gflops, "counted_on": where})
    for r in rows:
        r["ratio_to_first"] = r["fwd_gflops_per_image"] / rows[0]["fwd_gflops_per_image"]
    out = {"benchmark": "flops", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "args": vars(args), "counter": "torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add, "
           "eval-mode forward", "versions": {"torch": torch.__version__, "timm": timm.__version__}, "rows": rows}
    for r in rows:
        log(f"{r['model']} {r['kwargs'] or ''}: {r['fwd_gflops_per_image']:.2f} GFLOPs ({r['ratio_to_first']:.2f}x)")
    return emit(out, args.save)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup_device(args.device, args.threads)
    if args.flops_only:
        return count_only(args, device)
    sw = Switches(torch.bfloat16 if device.type == "cuda" else None, channels_last=True, compile=args.compile,
                  fused=use_fused("auto", "sgd", device))
    peak = device_peak(device, args.peak_tflops)
    log(f"{len(args.models)} models x k={args.attack_steps}, batch {args.batch} {args.image_size}px on {device} "
        f"({torch.get_num_threads()} threads), peak {peak['peak_tflops']:.3g} TFLOP/s ({peak['peak_source']})")
    out: dict[str, Any] = {
        "benchmark": "mfu", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "data": "synthetic", "device": device_info(device), "loadavg_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        **peak,
        "mfu_definition": "(2k+3) x fwd FLOPs per image x img/s / peak_tflops; on GPU MFU against the device's dense "
                          "bf16 peak for both loops (plain runs fp32); on CPU against the measured fp32 peak (best of matmul and conv)",
        "setup": {"ours": {**sw.describe(), "attack_bn": "eval", "attack_param_grads": False},
                  "plain": {"amp_dtype": "fp32", "channels_last": False, "attack_bn": "train",
                            "attack_param_grads": True}},
        "rows": [],
    }
    for model in args.models:
        try:
            gflops, counted_on = forward_gflops(model, args.image_size, args.num_classes, device)
        except Exception as e:  # noqa: BLE001
            out["rows"].append({"model": model, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            log(f"{model}: cannot build / count FLOPs: {e}")
            continue
        log(f"{model}: {gflops:.3f} GFLOPs per image forward at {args.image_size}px (counted on {counted_on})")
        for k in args.attack_steps:
            out["rows"].append(run_row(args, device, sw, model, k, gflops))
    out.update(remeasure_peak(peak, device))
    rows = [r for r in out["rows"] if "attack_steps" in r]
    for r in rows:
        add_mfu(r, out["peak_tflops"])
    log(f"peak used for MFU: {out['peak_tflops']:.3g} TFLOP/s ({out['peak_source']})")
    out["table_md"] = table_md(rows)
    if args.targets:
        out["targets"] = check_targets(rows, args, device)
    out["loadavg_end"] = os.getloadavg()
    log(out["table_md"])
    return emit(out, args.save)


if __name__ == "__main__":
    main()
