"""Peak memory of one PGD-k adversarial training step and the largest batch per GPU, by activation checkpointing mode.

For each model (``--models``) x ``perf.activation_checkpointing`` off / update (optimizer passes) / all (attack too), one "ours" training step exactly as
``benchmarks/train_step.py`` builds it (PGD-k attack with frozen parameters and eval-mode BN, Madry loss, backward,
Nesterov SGD; bf16 autocast + channels_last + fused SGD on CUDA, fp32 on CPU):

- CUDA: (a) ``torch.cuda.max_memory_allocated`` over one step at ``--batch`` (after one warm-up step, so optimizer
  state and cuDNN autotuning are in place), next to the memory held between steps (weights, gradients, momentum, the
  batch); (b) the largest batch per GPU that runs two steps without ``torch.cuda.OutOfMemoryError``: double from
  ``--batch`` until a step runs out of memory, then bisect between the last batch that fit and the first that did not,
  down to ``--granularity`` images, capped at ``--max-batch``; then images/s at that batch (``--iters`` steps).
- CPU: no OOM to search for (``largest_batch`` is null, with the reason). Every configuration runs in a fresh
  subprocess (``--_child``) so that one configuration's high-water mark cannot hide the next one's. After a warm-up
  step the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``); the step's peak is ``ru_maxrss`` after one
  more step minus the resident set held between steps (where the reset is not allowed: no warm-up, and the baseline
  is ``ru_maxrss`` after the model, optimizer and batch are built).

The checkpointing saving is ``peak_off / peak_on`` of the step's own memory (CUDA: peak minus the memory held between
steps; CPU: peak RSS minus the baseline). Checkpointing keeps only each residual block's input and recomputes its
inside during backward; its price is the step time, reported next to the peak (``time_on_over_off``). For Madry
training an attack pass keeps as many activations as the update's forward, so the peak is set by the attack's passes
as much as by the update: ``update`` alone saves little there, ``all`` saves the most. The peak hardly depends on k
(``--attack-steps``, default 1). Deep adversarial models are memory-bound: the denoising ResNet-152 of Xie thesis
Sec 4.5 trained with 32 images per GPU (PGD-30, 52 hours on 128 V100s).

    python benchmarks/memory.py --save benchmarks/results/h100_memory.json          # CUDA: 224 px, batch 64 start
    python benchmarks/memory.py --models resnet152_denoise --batch 32 --max-batch 1024 --checkpointing off,all
    python benchmarks/memory.py --batch 8 --image-size 64 --save benchmarks/results/cpu-2core_memory_64px.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from atscale.training.optim import use_fused  # noqa: E402
from train_step import (Switches, build_ours, device_info, emit, log, measure, setup_device,  # noqa: E402
                        synthetic_batch, sync)

GIB = 2**30
# fixed (not adaptive) glibc mmap threshold in the CPU children: tensors above 128 KiB are returned to the kernel when
# freed, so RSS follows the live tensors instead of glibc's cache of freed ones
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="resnet50,resnet152,resnet50_denoise,resnet152_denoise")
    p.add_argument("--checkpointing", default="off,update,all",
                   help="comma list of perf.activation_checkpointing modes: off, update (optimizer passes), all")
    p.add_argument("--batch", type=int, default=64, help="batch of the peak-memory step; start of the batch search")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--granularity", type=int, default=8, help="bisection stops when first bad - last good <= this")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--attack-steps", type=int, default=1, help="PGD iterations k")
    p.add_argument("--iters", type=int, default=3, help="CUDA: timed steps at the largest batch (0 = skip)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    p.add_argument("--save", default=None, help="also write the JSON to this path")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [c.strip() for c in args.checkpointing.split(",") if c.strip()]
    if not modes or set(modes) - {"off", "update", "all"}:
        p.error("--checkpointing is a comma list of off / update / all")
    args.checkpointing = modes
    if args.batch < 1 or args.max_batch < args.batch or args.attack_steps < 1 or args.granularity < 1:
        p.error("need 1 <= --batch <= --max-batch, --attack-steps >= 1, --granularity >= 1")
    return args


def row_ns(args: argparse.Namespace, model: str, batch: int, iters: int = 1, warmup: int = 1) -> argparse.Namespace:
    return argparse.Namespace(model=model, batch=batch, image_size=args.image_size, num_classes=args.num_classes,
                              attack_steps=args.attack_steps, iters=iters, warmup=warmup, model_kwargs={})


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                                                                  "CUDNN_STATUS_ALLOC_FAILED",
                                                                  "CUDNN_STATUS_NOT_SUPPORTED")))


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------- CUDA
def cuda_peak(args: argparse.Namespace, device: torch.device, sw: Switches, model: str) -> dict[str, Any]:
    """Memory held between steps and the peak of one step at ``--batch`` (after a warm-up step)."""
    ns = row_ns(args, model, args.batch)
    x, y = synthetic_batch(ns, device)
    step = build_ours(ns, device, sw, x, y)
    step()
    sync(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step()
    sync(device)
    res = {"step_s": time.perf_counter() - t, "held_gib": held / GIB,
           "peak_gib": torch.cuda.max_memory_allocated(device) / GIB}
    res["step_peak_gib"] = res["peak_gib"] - res["held_gib"]
    del step, x, y
    return res


def fits(args: argparse.Namespace, device: torch.device, sw: Switches, model: str, batch: int) -> bool:
    def two_steps() -> None:
        ns = row_ns(args, model, batch)
        x, y = synthetic_batch(ns, device)
        step = build_ours(ns, device, sw, x, y)
        step()
        step()
        sync(device)

    free(device)
    try:
        two_steps()
        ok = True
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        ok = False
    free(device)
    log(f"[{model}] batch {batch}: {'fits' if ok else 'OOM'}")
    return ok


def largest_batch(args: argparse.Namespace, device: torch.device, sw: Switches, model: str) -> dict[str, Any]:
    good, bad, b, probes = 0, None, args.batch, 0
    while True:  # doubling
        probes += 1
        if not fits(args, device, sw, model, b):
            bad = b
            break
        good = b
        if b >= args.max_batch:
            break
        b = min(2 * b, args.max_batch)
    while bad is not None and bad - good > args.granularity:  # bisection
        mid = (good + bad) // 2
        probes += 1
        if fits(args, device, sw, model, mid):
            good = mid
        else:
            bad = mid
    res: dict[str, Any] = {"largest_batch": good or None, "first_oom_batch": bad, "probes": probes,
                           "capped": bad is None}
    if good and args.iters > 0:
        free(device)
        try:
            ns = row_ns(args, model, good, iters=args.iters, warmup=1)
            m = measure(f"{model} batch {good}", lambda: build_ours(ns, device, sw, *synthetic_batch(ns, device)),
                        ns, device)
            res.update(img_per_s_at_largest=m["img_per_s"], peak_gib_at_largest=m["peak_mem_gib"])
        except Exception as e:  # noqa: BLE001  (fragmentation can make a batch at the edge fail on a rerun)
            if not is_oom(e):
                raise
            res["img_per_s_at_largest"] = None
            res["throughput_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        free(device)
    return res


def run_cuda(args: argparse.Namespace, device: torch.device, model: str, ckpt: str) -> dict[str, Any]:
    sw = Switches(torch.bfloat16, channels_last=True, fused=use_fused("auto", "sgd", device), checkpointing=ckpt)
    row: dict[str, Any] = {}
    try:
        row.update(cuda_peak(args, device, sw, model))
    except Exception as e:  # noqa: BLE001
        row["peak_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    free(device)
    try:
        row.update(largest_batch(args, device, sw, model))
    except Exception as e:  # noqa: BLE001  (keep the peak measured above; say why the search stopped)
        row["search_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


# ----------------------------------------------------------------------------------------------------------------- CPU
def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """Give glibc's free heap pages back to the kernel, so that memory the warm-up step freed but malloc kept does not
    count as held between steps (the parent also fixes ``MALLOC_MMAP_THRESHOLD_``: large tensors are mmap-ed and
    unmapped when freed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM, which ``ru_maxrss`` reads) to the current RSS, where allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return rss_bytes("VmHWM") <= rss_bytes() + (1 << 20)


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process. With a resettable peak-RSS counter: build, one warm-up step (grads,
    momentum, oneDNN caches), reset the counter, time and measure one step against the resident set held between
    steps. Without: build, one step, measured against ``ru_maxrss`` after the build (includes first-step state)."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    ns = argparse.Namespace(**cfg["ns"])
    sw = Switches(None, channels_last=True, fused=False, checkpointing=cfg["checkpointing"])
    x, y = synthetic_batch(ns, device)
    step = build_ours(ns, device, sw, x, y)
    gc.collect()
    warm = reset_peak_rss()
    if warm:
        step()
        gc.collect()
        trim_heap()
        reset_peak_rss()
        baseline = rss_bytes()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    loss = step()
    step_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_mib": baseline / 2**20, "peak_rss_mib": peak / 2**20, "step_peak_mib": (peak - baseline) / 2**20,
            "baseline_from": ("VmRSS between steps (after a warm-up step), peak-RSS counter reset there" if warm else
                              "ru_maxrss after the build, no warm-up (peak-RSS counter not resettable)"),
            "step_s": step_s, "loss": loss}


def run_cpu_child(args: argparse.Namespace, model: str, ckpt: str) -> dict[str, Any]:
    cfg = {"ns": vars(row_ns(args, model, args.batch)), "checkpointing": ckpt, "threads": args.threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(cfg)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **CHILD_ENV})
    if proc.returncode != 0:
        return {"error": f"child exited {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(largest_batch=None, largest_batch_reason="CPU: no device-memory limit to search (no OOM); "
               "the peak RSS of a step at --batch is reported instead")
    return res


# -------------------------------------------------------------------------------------------------------------- report
def table_md(rows: list[dict[str, Any]], cuda: bool) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    if cuda:
        lines = ["| model | ckpt | held GiB | step peak GiB | peak GiB | step s | largest batch | img/s there |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['checkpointing']} | {f(r.get('held_gib'), '.2f')} "
                         f"| {f(r.get('step_peak_gib'), '.2f')} | {f(r.get('peak_gib'), '.2f')} | "
                         f"{f(r.get('step_s'), '.3f')} | {f(r.get('largest_batch'), 'd')}"
                         f"{'+' if r.get('capped') else ''} | {f(r.get('img_per_s_at_largest'), '.0f')} |")
    else:
        lines = ["| model | ckpt | baseline MiB | step peak MiB | peak RSS MiB | step s | saving (off/this) "
                 "| time this/off |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['checkpointing']} | "
                         f"{f(r.get('baseline_mib'), '.0f')} | {f(r.get('step_peak_mib'), '.0f')} | "
                         f"{f(r.get('peak_rss_mib'), '.0f')} | {f(r.get('step_s'), '.2f')} | "
                         f"{f(r.get('saving_off_over_on'), '.2f')} | {f(r.get('time_on_over_off'), '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args._child is not None:
        print(json.dumps(child(json.loads(args._child))), flush=True)
        return None
    device = setup_device(args.device, args.threads)
    cuda = device.type == "cuda"
    log(f"{args.models} x checkpointing {args.checkpointing}, batch {args.batch} {args.image_size}px "
        f"PGD-{args.attack_steps} on {device}")
    out: dict[str, Any] = {
        "benchmark": "memory", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k != "_child"}, "data": "synthetic",
        "device": device_info(device), "loadavg_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "method": ("torch.cuda.max_memory_allocated over one step after a warm-up step; largest batch by doubling "
                   "then bisection on OutOfMemoryError" if cuda else
                   "one step per configuration in a fresh subprocess; step peak = ru_maxrss after the step minus "
                   "the resident set held between steps (after a warm-up step and a peak-RSS reset)"),
        "rows": [],
    }
    if not cuda:
        out["child_env"] = CHILD_ENV
    for model in args.models:
        for ckpt in args.checkpointing:
            log(f"== {model}, activation checkpointing {ckpt}")
            try:
                res = run_cuda(args, device, model, ckpt) if cuda else run_cpu_child(args, model, ckpt)
            except Exception as e:  # noqa: BLE001
                res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            free(device)
            out["rows"].append({"model": model, "checkpointing": ckpt, "batch": args.batch,
                                "image_size": args.image_size, "attack_steps": args.attack_steps, **res})
    key = "step_peak_gib" if cuda else "step_peak_mib"
    by = {(r["model"], r["checkpointing"]): r for r in out["rows"]}
    for (model, ckpt), r in by.items():
        off = by.get((model, "off"), {}).get(key)
        if ckpt != "off" and off and r.get(key):
            r["saving_off_over_on"] = off / r[key]
            if r.get("step_s") and by[(model, "off")].get("step_s"):
                r["time_on_over_off"] = r["step_s"] / by[(model, "off")]["step_s"]
            if cuda and r.get("largest_batch") and by[(model, "off")].get("largest_batch"):
                r["largest_batch_gain"] = r["largest_batch"] / by[(model, "off")]["largest_batch"]
    out["table_md"] = table_md(out["rows"], cuda)
    out["loadavg_end"] = os.getloadavg()
    log(out["table_md"])
    return emit(out, args.save)


if __name__ == "__main__":
    main()
