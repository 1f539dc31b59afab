"""Weak scaling of synchronized adversarial training: step time at a fixed per-rank batch for 1, 2, ... processes.

Each rank runs atscale's step (PGD-k on the unwrapped model, Madry loss through DDP, one all-reduce per step) on
synthetic data; the driver launches ``torchrun`` once per world size and prints one JSON object with the step times,
throughput and the overhead ratio ``t(world) / t(1)`` (1.0 = perfect weak scaling).

    python benchmarks/dist_step.py --worlds 1,2 --model resnet18 --batch 16 --image-size 64 --attack-steps 2 \\
        --threads-per-rank 1 --save benchmarks/results/cpu-2core_dist_weak_scaling_resnet18.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2", help="comma list of process counts (driver mode)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--attack-steps", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--save", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torch

    from atscale import distributed as dist
    from atscale.attacks import PGD
    from atscale.runtime import autocast
    from atscale.models import create_model
    from atscale.training.objectives import Madry

    torch.set_num_threads(args.threads_per_rank)
    env = dist.DistEnv.from_env()
    device = dist.init(env)
    torch.manual_seed(0)
    model = create_model(args.model, 1000, [0.5] * 3, [0.5] * 3).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    amp = torch.bfloat16 if device.type == "cuda" else None
    attack, objective = PGD(16 / 255, 1 / 255, args.attack_steps, targeted=True, amp_dtype=amp), Madry()
    g = torch.Generator(device=device).manual_seed(env.rank)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
    ddp.train()
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t = time.perf_counter()
        x_adv = attack(model, x, y)
        with autocast(device, amp):
            out = objective(ddp, x, x_adv, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if env.rank == 0:
        med = statistics.median(times)
        world = dist.world_size()
        print("RESULT " + json.dumps({"world_size": world, "median_s_per_step": med, "step_times_s": times,
                                      "img_per_s_total": args.batch * world / med, "device": str(device)}), flush=True)
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(args: argparse.Namespace) -> dict:
    runs = []
    for world in [int(w) for w in args.worlds.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker",
               *[a for a in sys.argv[1:] if not a.startswith("--save") and a != args.save]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank)}
        print(f"world {world}: {' '.join(cmd[3:5])}", file=sys.stderr)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"world {world} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        runs.append(json.loads(line[len("RESULT "):]))
    base = runs[0]["median_s_per_step"]
    for r in runs:
        r["overhead_vs_1"] = r["median_s_per_step"] / base
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    result = {"benchmark": "dist_weak_scaling", "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
              "args": {k: v for k, v in vars(args).items() if k != "worker"}, "data": "synthetic",
              "backend": "nccl" if torch.cuda.is_available() else "gloo",
              "device": {"cpu": cpu, "cpu_count": os.cpu_count(),
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "versions": {"torch": torch.__version__, "python": platform.python_version()}, "runs": runs}
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text + "\n")
    return result


if __name__ == "__main__":
    a = parse_args()
    worker(a) if a.worker else driver(a)
