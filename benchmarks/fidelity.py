"""Reproduction report at digits scale: the training strategies of configs/imagenet/ side by side, several seeds each.

Every strategy is the digits twin of its ImageNet preset (``atscale.presets.digits_twin``: same objective and attack
shape on 32 px digits), trained for the same number of epochs with one common model, recipe and threat model so that
the numbers compare: the narrow ResNet-18 of the tests (channels 16..128; the twins' one-block bottleneck ResNets learn
digits too slowly for a few epochs), SGD lr 0.4 per 256 images, cosine decay after half an epoch of warmup, no label
smoothing (the digits recipe of configs/demo.yaml); L-inf eps 32/255 (the demo's: digits' flat backgrounds make
8/255 nearly harmless, a clean model keeps ~65% under PGD-10) for training (PGD-2, step 16/255; FGSM-RS step 40/255
for Fast; step 32/255 and epochs / m for Free; the SAT pair keeps its single-step attack) and untargeted PGD-10
(step 8/255, random start) at eps 32/255 for evaluation on the 359 validation images.

    python benchmarks/fidelity.py --seeds 0,1,2 --epochs 3 --out benchmarks/results/fidelity_digits

writes ``<out>.json`` (every run, the seeds, mean and spread per strategy), ``<out>.md`` (the table) and ``<out>.png``
(clean vs PGD-10 accuracy, mean and min..max over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atscale.config import load_config  # noqa: E402
from atscale.evaluate import evaluate_checkpoint  # noqa: E402
from atscale.train import main as train_main  # noqa: E402

COMMON = {"attack.eps": 32, "attack.step": 16, "attack.iters": 2, "attack.targeted": False,
          "optim.lr": 0.4, "schedule.name": "cosine", "schedule.warmup_epochs": 0.5, "objective.label_smoothing": 0.0,
          "model.arch": "resnet18", "model.kwargs": {"channels": [16, 32, 64, 128]},
          "eval.steps": [10], "eval.eps": 32, "eval.step": 8, "eval.targeted": False, "eval.random_start": True,
          "eval.every_epochs": 0, "eval.select_best": False, "eval.early_stop_patience": 0, "eval.max_images": 0,
          "log.progress": False, "log.tensorboard": False, "run.export": False, "run.keep_last": 1}

# label -> (preset, extra overrides, BN domains to evaluate)
STRATEGIES: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "clean (standard)": ("r152_iat", {"objective.name": "clean", "attack.name": "none"}, ()),
    "madry 100% adv (IAT)": ("r152_iat", {}, ()),
    "mixed 50/50": ("r152_mixed", {}, ()),
    "ratio 40% clean": ("r152_ratio", {}, ()),
    "ALP": ("r152_alp", {}, ()),
    "MBN": ("r152_mbn", {}, ("adv", "clean")),
    "GroupNorm mixed": ("r152_gn_mixed", {"model.kwargs": {"channels": [32, 64, 128, 256], "norm_layer": "groupnorm"}},
                        ()),
    "TRADES": ("trades_r50_eps8", {}, ()),
    "MART": ("mart_r50_eps8", {}, ()),
    "Fast (FGSM-RS)": ("fast_r50_eps4", {"attack.step": 40}, ()),
    "Free (m=4)": ("free_r50_eps4", {"attack.step": 32}, ()),
    "SAT ReLU (PGD-1)": ("r50_sat_relu", {"attack.iters": 1, "attack.step": 32}, ()),
    "SAT SiLU (PGD-1)": ("r50_sat_silu", {"attack.iters": 1, "attack.step": 32,
                                          "model.kwargs": {"channels": [16, 32, 64, 128], "act_layer": "silu"}}, ()),
}


DEFAULT = ("clean (standard)", "madry 100% adv (IAT)", "ALP", "TRADES", "MART", "Fast (FGSM-RS)", "Free (m=4)")


def run_one(label: str, seed: int, epochs: int, data_root: str, out_dir: Path, threads: int) -> list[dict]:
    preset, extra, domains = STRATEGIES[label]
    over = {**COMMON, **extra, "run.seed": seed, "data.root": data_root, "run.out_dir": str(out_dir),
            "run.name": f"{preset}_{seed}", "run.threads": threads}
    base = load_config(REPO / "configs" / "imagenet" / f"{preset}.yaml", twin="digits")
    over["schedule.epochs"] = max(1, math.ceil(epochs / base.objective.free_replays)) \
        if base.objective.name == "free" else epochs
    if base.data.phases:  # progressive resizing: the twin's phases over this run's epochs
        last, phases = 0, []
        for ph in base.data.phases:
            until = min(over["schedule.epochs"], max(last + 1, round(ph["until_epoch"] * over["schedule.epochs"]
                                                                     / base.schedule.epochs)))
            if until > last:
                phases.append({**ph, "until_epoch": until})
                last = until
        phases[-1]["until_epoch"] = over["schedule.epochs"]
        over["data.phases"] = phases
    if base.schedule.bn_eval_last_epochs:
        over["schedule.bn_eval_last_epochs"] = max(1, round(epochs / 8))
    cfg = load_config(REPO / "configs" / "imagenet" / f"{preset}.yaml",
                      [f"{k}={json.dumps(v)}" for k, v in over.items()], twin="digits")
    t0 = time.perf_counter()
    res = train_main(cfg)
    secs = time.perf_counter() - t0
    rows = []
    for dom in domains or ("",):
        ev = res["eval"] if not dom or dom == (cfg.model.eval_domain or cfg.model.bn_domains[0]) else \
            evaluate_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", [
                f"eval.bn_domain={dom}", "log.progress=false", f"eval.out={cfg.run_dir / f'eval_{dom}'}"])["results"]
        name = f"{label} [{dom} BN]" if dom else label
        rows.append({"strategy": name, "preset": preset, "seed": seed, "clean": ev["clean"]["acc"],
                     "pgd10": ev["pgd10"]["acc"], "train_seconds": secs, "epochs": cfg.schedule.epochs,
                     "objective": cfg.objective.name, "attack": f"{cfg.attack.name} eps {cfg.attack.eps:g} step "
                     f"{cfg.attack.step:g} x{cfg.attack.iters}"})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == name]
        agg = {"strategy": name, "n": len(rs), "preset": rs[0]["preset"], "attack": rs[0]["attack"]}
        for k in ("clean", "pgd10"):
            v = [r[k] for r in rs]
            agg[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                      "min": min(v), "max": max(v)}
        agg["train_seconds"] = statistics.fmean(r["train_seconds"] for r in rs)
        out.append(agg)
    return out


def table(summary: list[dict], seeds: list[int], epochs: int) -> str:
    lines = [f"Digits twins, {epochs} epochs, seeds {seeds}; train eps 32/255; eval untargeted PGD-10 eps 32/255 "
             "(mean ± std over seeds, accuracy %).", "",
             "| strategy | preset | train attack | clean | PGD-10 | train s/run |", "|---|---|---|---|---|---|"]
    for a in summary:
        c, p = a["clean"], a["pgd10"]
        lines.append(f"| {a['strategy']} | {a['preset']} | {a['attack']} | {100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
                     f" | {100 * p['mean']:.1f} ± {100 * p['std']:.1f} | {a['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for a in summary:
        c, p = a["clean"], a["pgd10"]
        ax.errorbar(100 * c["mean"], 100 * p["mean"], xerr=[[100 * (c["mean"] - c["min"])], [100 * (c["max"] - c["mean"])]],
                    yerr=[[100 * (p["mean"] - p["min"])], [100 * (p["max"] - p["mean"])]], fmt="o", capsize=3,
                    label=a["strategy"])
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("PGD-10 accuracy, eps 32/255 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--strategies", default=",".join(DEFAULT), help="comma-separated labels, or 'all'")
    p.add_argument("--data-root", default=str(REPO / "data" / "digits"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fidelity_digits"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = list(STRATEGIES) if args.strategies == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in labels if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".runs.jsonl")  # one line per finished run: an interrupted report resumes from here
    done = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    rows: list[dict] = [r for r in done if r["epochs_requested"] == args.epochs]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            for seed in seeds:
                if any(r["label"] == label and r["seed"] == seed for r in rows):
                    continue
                got = run_one(label, seed, args.epochs, args.data_root, Path(tmp), args.threads)
                for r in got:
                    r.update(label=label, epochs_requested=args.epochs)
                    with partial.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                rows += got
                for r in got:
                    print(f"{r['strategy']:<28} seed {seed}: clean {100 * r['clean']:.1f}%  PGD-10 "
                          f"{100 * r['pgd10']:.1f}%  ({r['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    rows = [r for r in rows if r["label"] in labels and r["seed"] in seeds]
    summary = summarize(rows)
    meta = {"seeds": seeds, "epochs": args.epochs, "common_overrides": COMMON, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": "cpu", "total_seconds": time.perf_counter() - t0,
            "command": "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2))
    md = table(summary, seeds, args.epochs)
    out.with_suffix(".md").write_text(md)
    plot(summary, out.with_suffix(".png"), f"digits twins, {args.epochs} epochs, seeds {seeds}")
    print(md)
    print(json.dumps({"summary": summary, "meta": meta}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
