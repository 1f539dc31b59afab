"""Cost per image of the evaluation suite's attacks (``atscale.attacks.make_attack``) on a tiny digits ResNet.

Attacks: PGD-10, APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (a few hundred queries),
MI-FGSM, DI2-FGSM (thesis defaults N = min(eps + 4, 1.25 eps), step 1/255) and the "standard" composite (APGD-CE,
APGD-T, FAB-T, Square on the images still correct), all Linf at eps 8/255 on the first ``--images`` validation images.
The model is the tiny timm ResNet-18 of the tests (channels 8-16-32-64, 32 px digits) trained cleanly for a few epochs
in-process (or ``--checkpoint``), so early stopping (restarts, composite, Square) behaves as on a real model.

Per attack: the fastest and the median wall seconds of ``perturb`` over ``--repeats`` runs (after one untimed warm-up
on a few images; on a shared machine the fastest run is the better estimate of the attack's own cost), ms per image,
the model's forward passes per image split into gradient passes (forward + input-gradient backward) and forward-only
passes (counted by a pre-forward hook), and the accuracy left. Prints one JSON object.

    python benchmarks/attack_cost.py --threads 1 --save benchmarks/results/cpu-2core_attack_cost.json   # CPU, minutes
    python benchmarks/attack_cost.py --device cuda --images 512 --steps 100 --square-queries 5000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import atscale.models  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
from torch import nn

from atscale.attacks import make_attack
from train_step import device_info, emit, sync  # benchmarks/ shares the device record

ATTACKS = ("pgd-10", "apgd-ce", "apgd-t", "fab-t", "square", "mi-fgsm", "di2-fgsm", "standard")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--images", type=int, default=None, help="images attacked (default 32 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=None,
                   help="APGD / FAB iterations, also inside standard (default 25 on CPU, 100 on CUDA = AutoAttack)")
    p.add_argument("--square-queries", type=int, default=300, help="Square queries, also inside standard")
    p.add_argument("--eps", type=float, default=8.0, help="Linf budget in 0..255 pixel units")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per attack (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--epochs", type=int, default=4, help="clean training epochs of the digits model")
    p.add_argument("--checkpoint", default=None, help="use this atscale checkpoint instead of training one")
    p.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                   help="attack autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine sharing)")
    p.add_argument("--save", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.images = args.images or (512 if cuda else 32)
    args.steps = args.steps or (100 if cuda else 25)
    args.repeats = args.repeats or (3 if cuda else 2)
    if min(args.images, args.steps, args.repeats, args.square_queries) < 1:
        p.error("need --images, --steps, --repeats, --square-queries >= 1")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def digits_model_and_data(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, torch.Tensor,
                                                                                  torch.Tensor, dict]:
    """Train (or load) the tiny digits ResNet; return it in eval mode with the first validation images."""
    from atscale.config import DataCfg, load_config
    from atscale.data import build_digits, make_loader
    from atscale.checkpoint import model_from_checkpoint
    from atscale.train import main

    work = Path(tempfile.mkdtemp(prefix="attack_cost_"))
    root = work / "digits"
    root.mkdir()
    build_digits(root, size=32, val_fraction=0.2, seed=0)
    ckpt = args.checkpoint
    info: dict[str, Any] = {"data": "sklearn digits upscaled to 32 px (FFCV), validation split"}
    if ckpt is None:
        overrides = {
            "data.source": "digits", "data.root": str(root), "data.batch_size": 64, "data.eval_batch_size": 200,
            "data.image_size": 32, "data.val_size": 32, "data.val_crop_ratio": 1.0, "data.flip": False,
            "data.rrc_scale": [0.6, 1.0], "data.num_workers": 2,
            "model.arch": "resnet18", "model.kwargs": {"channels": [8, 16, 32, 64]}, "model.mean": [0.5] * 3,
            "model.std": [0.5] * 3, "objective.name": "clean", "attack.name": "none", "optim.lr": 0.4,
            "optim.weight_decay": 5e-4, "schedule.epochs": args.epochs, "schedule.name": "cosine",
            "schedule.warmup_epochs": 0.5, "eval.steps": [1], "eval.max_images": 32, "eval.every_epochs": 0,
            "log.progress": False, "log.tensorboard": False, "run.out_dir": str(work / "runs"), "run.name": "clean",
            "run.export": False, "run.device": "cpu",
        }
        t0 = time.perf_counter()
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        main(cfg)
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    model, _, _ = model_from_checkpoint(ckpt, device)
    dcfg = DataCfg(root=str(root), eval_batch_size=args.images, image_size=32, val_size=32, val_crop_ratio=1.0)
    x, y = next(iter(make_loader(root, "val", dcfg, device, 0, train=False)))
    return model.eval(), x[: args.images].float().contiguous(), y[: args.images], info


class PassCounter:
    """Counts images through the model's forward, split by whether autograd is recording (gradient passes)."""

    def __init__(self, model: nn.Module):
        self.grad = self.plain = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        n = inputs[0].shape[0]
        if torch.is_grad_enabled() and inputs[0].requires_grad:
            self.grad += n
        else:
            self.plain += n

    def reset(self) -> None:
        self.grad = self.plain = 0


def build(name: str, args: argparse.Namespace, amp: torch.dtype | None):
    eps = args.eps / 255
    common = dict(eps=eps, seed=0, amp_dtype=amp)
    if name == "pgd-10":
        return make_attack("pgd", steps=10, **common), {"steps": 10, "step": "2.5 eps / 10"}
    if name in ("apgd-ce", "apgd-t", "fab-t"):
        return make_attack(name, steps=args.steps, **common), {"steps": args.steps}
    if name == "square":
        return make_attack("square", steps=args.square_queries, **common), {"queries": args.square_queries}
    if name in ("mi-fgsm", "di2-fgsm"):
        atk = make_attack(name, steps=0, **common)
        return atk, {"steps": atk.iters, "step": "1/255"}
    atk = make_attack("standard", steps=args.steps, square_queries=args.square_queries, **common)
    return atk, {"steps": args.steps, "square_queries": args.square_queries}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda") else None
    model, x, y, data_info = digits_model_and_data(args, device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # again: training may have changed it
    counter = PassCounter(model)
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item()
    log(f"attack cost: {args.images} images on {device} ({torch.get_num_threads()} threads), clean acc {clean_acc:.3f}")
    out: dict[str, Any] = {
        "benchmark": "attack_cost", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "device": device_info(device), "loadavg_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "model": "timm resnet18, channels 8-16-32-64, 10 classes, 32x32 input, trained cleanly on digits",
        **data_info, "eps": f"{args.eps:g}/255 (Linf)", "images": args.images, "clean_acc": clean_acc,
        "amp_dtype": str(amp).replace("torch.", "") if amp else "fp32",
        "setup": "min and median wall seconds of perturb() over the repeats after one untimed warm-up on 4 images "
                 "(ms_per_image uses the min); "
                 "grad_passes / forward_passes = images through the model with / without autograd per attacked image",
        "attacks": {},
    }
    if args.note:
        out["note"] = args.note
    for name in args.attacks:
        atk, params = build(name, args, amp)
        atk.perturb(model, x[:4], y[:4])  # warm-up (allocations, kernels)
        times = []
        for _ in range(args.repeats):
            atk.reseed(0)
            counter.reset()
            sync(device)
            t = time.perf_counter()
            res = atk.perturb(model, x, y)
            sync(device)
            times.append(time.perf_counter() - t)
        with torch.no_grad():
            acc = (model(res.x_adv).argmax(1) == y).float().mean().item()
        sec = min(times)
        rec = {**params, "seconds": round(sec, 4), "seconds_median": round(statistics.median(times), 4),
               "ms_per_image": round(1e3 * sec / args.images, 3),
               "grad_passes_per_image": round(counter.grad / args.images, 2),
               "forward_passes_per_image": round(counter.plain / args.images, 2), "robust_acc": acc}
        if name == "standard":
            rec["attacked"] = res.attacked
            rec["robust_after"] = res.robust_after
        log(f"[{name}] {rec['ms_per_image']:.2f} ms/image, acc {acc:.3f}, "
            f"grad passes/img {rec['grad_passes_per_image']}")
        out["attacks"][name] = rec
    counter.handle.remove()
    out["loadavg_end"] = os.getloadavg()
    out["summary_ms_per_image"] = {k: v["ms_per_image"] for k, v in out["attacks"].items()}
    return emit(out, args.save)


if __name__ == "__main__":
    main()
