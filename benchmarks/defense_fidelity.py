"""Fidelity of the pre-processing defense papers' claims at digits scale (issue 14), several seeds.

Per seed, every run is the digits twin of its ``configs/cifar10/`` preset (``--twin digits``), with one threat model
so the numbers compare: L-inf eps 32/255 (digits' flat backgrounds make 8/255 nearly harmless), PGD-5 with step 8/255
for the pre-processors' training attacks; T and f_a are ``benchmarks/fidelity.py``'s narrow ResNet-18 with its digits
recipe (see ``NET``, ``RECIPE``), T trained for twice the epochs. The chain is the papers':

1. the target T: TRADES ResNet-18 (CIFAR stem) twin;
2. pre-processors against the fixed T: JATP (full examples), the same network and loss on static examples
   (``nrp_static``), HGD and APE-G (static baselines), JATP' (T and P updated jointly) and ARN (seen attacks: PGD
   untargeted and targeted, the paper's defense_PP);
3. the adversarial transformation: f_b untrained, trained cleanly, adversarially trained; f_a trained on g(x).

Every model is evaluated on the 359 digits val images by one suite: clean, PGD-20 through the whole model, PGD-20
with BPDA (the pre-processor's backward = identity; for g this is the plain attack, BPDA-I) and PGD-20 with EOT over 4
draws, robust = robust to all (``worst``). For the adversarial transformation, ``||x - E[g(x)]||_inf`` is estimated on
64 val images with 64 draws each (the paper's Table 1 uses 5000 draws).

Claims (the report marks each reproduced, not reproduced or within noise: seed means, a step counts when it exceeds
2 standard errors of a difference of two accuracies over the val images of all seeds):
1. degradation effect (JATP Fig. 1, Table 1): a baseline trained on static examples (HGD, APE-G, static NRP) lowers
   T's white-box worst-case accuracy; JATP lowers it less than each baseline;
2. full adversarial examples help (JATP Sec 2.2): JATP > the same network on static examples (``nrp_static``);
3. adversarial transformation (Xiao & Zheng Table 1): BPDA-I accuracy and ``||x - E[g(x)]||_inf`` rise from untrained
   to clean to adversarially trained f_b;
4. adaptive attacks: for each defense, the gap between the plain PGD-20 and the worst case (BPDA / EOT), reported as
   measured, whatever the papers claim.

    python benchmarks/defense_fidelity.py --seeds 0,1 --epochs 3 --out benchmarks/results/defense_fidelity_digits

writes ``<out>.json`` (every run and the claims), ``<out>.md`` (tables) and ``<out>.png`` (worst-case accuracy per
defense, mean and min..max over seeds); ``<out>.runs.jsonl`` keeps finished runs so an interrupted report resumes.
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

from atscale.checkpoint import model_from_checkpoint  # noqa: E402
from atscale.config import load_config  # noqa: E402
from atscale.data import make_loader  # noqa: E402
from atscale.evaluation.evaluator import run_suite  # noqa: E402
from atscale.evaluation.suites import AttackSpec, Suite  # noqa: E402
from atscale.train import main as train_main  # noqa: E402

EPS, STEP, ITERS = 32, 8, 5
COMMON = {"eval.every_epochs": 0, "eval.select_best": False, "eval.early_stop_patience": 0, "eval.steps": [10],
          "eval.eps": EPS, "eval.step": STEP, "eval.targeted": False, "eval.max_images": 64, "log.progress": False,
          "log.tensorboard": False, "run.export": False, "run.keep_last": 1}
PGD = {"attack.eps": EPS, "attack.step": STEP, "attack.iters": ITERS}
# the classifiers (T, f_a) and f_b train with benchmarks/fidelity.py's digits recipe and T / f_a use its network (the
# narrow timm ResNet-18; the one-block CIFAR-stem twin learns digits too slowly for a few epochs): SGD lr 0.4 per 256
# images, cosine after half an epoch of warmup, PGD-2 step 16/255 for the adversarially trained ones
NET = {"model.arch": "resnet18", "model.kwargs": {"channels": [16, 32, 64, 128]}}
RECIPE = {"optim.lr": 0.4, "optim.ref_batch": 256, "optim.nesterov": True, "schedule.name": "cosine",
          "schedule.warmup_epochs": 0.5}
PGD2 = {"attack.eps": EPS, "attack.step": 16, "attack.iters": 2}
DEF = {**NET, **PGD, "defense.feature_layer": "layer3.1.conv2"}
SEEN = {"attack": "pgd", "eps": EPS, "steps": ITERS, "step": STEP}  # ARN's seen attacks: PGD_N + PGD_T (defense_PP)
# label -> (preset, overrides, what the run needs: target / base)
RUNS: dict[str, tuple[str, dict, str]] = {
    "target (TRADES)": ("trades_r18_cifar10", {**NET, **RECIPE, **PGD2}, ""),
    "JATP": ("jatp_nrp_trades_r18", DEF, "target"),
    "NRP static": ("nrp_static_trades_r18", DEF, "target"),
    "HGD": ("hgd_trades_r18", {**DEF, "defense.feature_layer": ""}, "target"),
    "APE-G": ("ape_g_trades_r18", {**NET, **PGD}, "target"),
    "JATP'": ("jatp_joint_nrp_trades_r18", DEF, "target"),
    "ARN": ("arn_trades_r18", {**NET, "objective.arn_attacks": [{**SEEN, "targeted": t} for t in (False, True)]},
            "target"),
    "f_b clean": ("fb_vgg_small_clean", RECIPE, ""),
    "f_b adv": ("fb_vgg_small_adv", {**RECIPE, **PGD2}, ""),
    "adv. transform, f_b untrained": ("adv_transform_fb_untrained", {**NET, **RECIPE}, ""),
    "adv. transform, f_b clean": ("adv_transform_fb_clean", {**NET, **RECIPE}, "f_b clean"),
    "adv. transform, f_b adv": ("adv_transform_fb_adv", {**NET, **RECIPE}, "f_b adv"),
}
DEFENSES = ("JATP", "NRP static", "HGD", "APE-G", "JATP'", "ARN")
TRANSFORMS = ("adv. transform, f_b untrained", "adv. transform, f_b clean", "adv. transform, f_b adv")
DELTA = 0.2  # the L-inf range of g: the presets' defense.delta 51 (/255), Xiao & Zheng Sec 4.1


def suite(defended: bool) -> Suite:
    rows = [AttackSpec("clean", "clean"), AttackSpec("pgd20", "pgd", eps=EPS, steps=20, step=STEP)]
    if defended:
        rows += [AttackSpec("pgd20-bpda", "pgd", eps=EPS, steps=20, step=STEP, through="bpda"),
                 AttackSpec("pgd20-eot4", "pgd", eps=EPS, steps=20, step=STEP, through="eot4")]
    return Suite("defense-fidelity", rows, aggregates={"worst": [r.label for r in rows if r.attack != "clean"]})


def train(label: str, seed: int, epochs: int, root: str, out: Path, ckpts: dict[str, Path]) -> Path:
    preset, extra, needs = RUNS[label]
    over = {**COMMON, **extra, "run.seed": seed, "data.source": "digits", "data.root": root, "run.out_dir": str(out),
            "run.name": f"{preset}_{seed}", "schedule.epochs": 2 * epochs if label == "target (TRADES)" else epochs}
    if needs == "target":
        over["model.init_from"] = str(ckpts["target (TRADES)"])
    elif needs:
        over["defense.base_from"] = str(ckpts[needs])
    cfg = load_config(REPO / "configs" / "cifar10" / f"{preset}.yaml",
                      [f"{k}={json.dumps(v)}" for k, v in over.items()], twin="digits")
    train_main(cfg)
    return cfg.run_dir / "checkpoints" / "last.pt"


def transform_distance(model, x: torch.Tensor, draws: int = 64) -> float:
    """mean over images of ||x - E[g(x)]||_inf, E over ``draws`` random starts (Xiao & Zheng Table 1)."""
    with torch.no_grad():
        mean = torch.stack([model.preprocessor.transform(x, call=c) for c in range(draws)]).mean(0)
    return float((mean - x).flatten(1).abs().amax(1).mean())


def evaluate(label: str, ckpt: Path, root: str) -> dict:
    model, cfg, _ = model_from_checkpoint(ckpt, torch.device("cpu"))
    loader = make_loader(root, "val", cfg.data, torch.device("cpu"), 0, train=False)
    defended = hasattr(model, "preprocessor")
    doc = run_suite(model, loader, suite(defended), seed=0, progress=False, probes=False)
    row = {**{k: v["acc"] for k, v in doc["results"].items()}, "n": doc["n"]}
    if label in TRANSFORMS:
        x, _ = next(iter(loader))
        row["dist_inf"] = transform_distance(model, x[:64])
    return row


def to_train(rows: list[dict], seed: int) -> list[str]:
    """The runs of ``seed`` still to do, in chain order: each missing row and the runs it needs (their checkpoints
    are gone with the earlier process, so a needed run trains again; its row is not rewritten)."""
    have = {r["label"] for r in rows if r["seed"] == seed}
    todo = {label for label in RUNS if not label.startswith("f_b ") and label not in have}
    todo |= {"target (TRADES)" if RUNS[label][2] == "target" else RUNS[label][2] for label in todo} - {""}
    return [label for label in RUNS if label in todo]


def mean(rows: list[dict], label: str, key: str) -> float:
    return statistics.fmean(r[key] for r in rows if r["label"] == label)


def images(rows: list[dict], *labels: str) -> int:
    """Val images behind the seed means of ``labels``: the fewest that any of them was evaluated on, over its seeds."""
    return min(sum(r["n"] for r in rows if r["label"] == lab) for lab in labels)


def rises(values: list[float], n: int) -> str:
    """The verdict on "each value exceeds the one before": reproduced when every step is above 2 standard errors of
    the difference of two accuracies over ``n`` images each, not reproduced when any step is below -2 SE, otherwise
    within noise (the images are paired, so treating them as independent is conservative)."""
    steps = [(b - a) / max(1e-12, math.sqrt((a * (1 - a) + b * (1 - b)) / n)) for a, b in zip(values, values[1:])]
    return "reproduced" if min(steps) > 2 else "not reproduced" if min(steps) < -2 else "within noise"


def claims(rows: list[dict]) -> list[dict]:
    """The claims whose runs exist in ``rows`` (an interrupted report marks only what it measured); accuracies are
    seed means over the images each row counts (``n``) summed over seeds, judged by :func:`rises`."""
    have = set(r["label"] for r in rows)
    w = {lab: mean(rows, lab, "worst") for lab in have}
    t = w.get("target (TRADES)")
    out = []
    for b in ("NRP static", "HGD", "APE-G"):
        if t is None or b not in w:
            continue
        out.append({"claim": f"1. {b} (static examples) lowers T's white-box worst case ({100 * w[b]:.1f}% vs "
                             f"{100 * t:.1f}%)", "verdict": rises([w[b], t], images(rows, b, "target (TRADES)"))})
        if "JATP" in w:
            out.append({"claim": f"1. JATP lowers it less than {b} ({100 * w['JATP']:.1f}% vs {100 * w[b]:.1f}%)",
                        "verdict": rises([w[b], w["JATP"]], images(rows, b, "JATP"))})
    if {"JATP", "NRP static"} <= have:
        out.append({"claim": f"2. full examples beat static ones: JATP {100 * w['JATP']:.1f}% > NRP static "
                             f"{100 * w['NRP static']:.1f}%", "verdict": rises([w["NRP static"], w["JATP"]],
                                                                images(rows, "NRP static", "JATP"))})
    if set(TRANSFORMS) <= have:
        acc = [mean(rows, lab, "pgd20") for lab in TRANSFORMS]
        dist = [mean(rows, lab, "dist_inf") for lab in TRANSFORMS]
        out.append({"claim": "3. BPDA-I accuracy rises untrained -> clean -> adv f_b (" + " -> ".join(
            f"{100 * a:.1f}%" for a in acc) + ")", "verdict": rises(acc, images(rows, *TRANSFORMS))})
        # a mean of per-image maxima reaches Delta once some pixel of every image sits at the ball's edge in every
        # draw: the flat black background clips the random start at 0, so its pixels move up in every draw
        saturated = sum(d > DELTA - 0.005 for d in dist) >= 2
        rise = [b - a for a, b in zip(dist, dist[1:])]
        out.append({"claim": "3. ||x - E[g(x)]||_inf rises untrained -> clean -> adv f_b (" + " -> ".join(
            f"{d:.3f}" for d in dist) + ")" + (f": two or more at Delta = {DELTA}, where the measure saturates"
                                              if saturated else ""),
                    "verdict": "not testable" if saturated else
                    "reproduced" if min(rise) > 0.005 else "not reproduced"})
    for lab in [lab for lab in DEFENSES + TRANSFORMS if lab in have]:
        gap = mean(rows, lab, "pgd20") - mean(rows, lab, "worst")
        out.append({"claim": f"4. {lab}: plain PGD-20 {100 * mean(rows, lab, 'pgd20'):.1f}%, adaptive worst case "
                             f"{100 * mean(rows, lab, 'worst'):.1f}% (gap {100 * gap:.1f} points)",
                    "verdict": "measured"})
    return out


def report(rows: list[dict], seeds: list[int], epochs: int) -> str:
    lines = [f"Digits twins of configs/cifar10/, {epochs} epochs, seeds {seeds}; eps {EPS}/255, PGD-20 step {STEP}/255;"
             " accuracy % (mean ± std over seeds).", "",
             "| model | clean | PGD-20 | PGD-20 BPDA | PGD-20 EOT-4 | worst | dist_inf |", "|---|---|---|---|---|---|---|"]
    for lab in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == lab]

        def cell(k: str, pct: bool = True) -> str:
            v = [r[k] for r in rs if k in r]
            if not v:
                return "-"
            m, s = statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f}"
        lines.append(f"| {lab} | {cell('clean')} | {cell('pgd20')} | {cell('pgd20-bpda')} | {cell('pgd20-eot4')} | "
                     f"{cell('worst')} | {cell('dist_inf', False)} |")
    lines += ["", "| claim | at this scale |", "|---|---|"]
    for c in claims(rows):
        lines.append(f"| {c['claim']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows if "worst" in r))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, lab in enumerate(labels):
        for j, key in enumerate(("pgd20", "worst")):
            v = [100 * r[key] for r in rows if r["label"] == lab]
            m = statistics.fmean(v)
            ax.bar(i + 0.4 * j, m, width=0.4, color=("tab:blue", "tab:red")[j], label=("plain PGD-20", "worst case")[j]
                   if i == 0 else None, yerr=[[m - min(v)], [max(v) - m]], capsize=2)
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"accuracy at eps {EPS}/255 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data-root", default=str(REPO / "data" / "digits"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "defense_fidelity_digits"))
    p.add_argument("--report-only", action="store_true", help="write the report from <out>.runs.jsonl, train nothing")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".runs.jsonl")
    rows = [r for r in (json.loads(line) for line in partial.read_text().splitlines())
            if r["epochs"] == args.epochs] if partial.exists() else []
    rows = list({(r["label"], r["seed"]): r for r in rows}.values())  # a rerun's row replaces an earlier one
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [] if args.report_only else seeds:
            ckpts: dict[str, Path] = {}
            for label in to_train(rows, seed):
                t1 = time.perf_counter()
                ckpts[label] = train(label, seed, args.epochs, args.data_root, Path(tmp), ckpts)
                if label.startswith("f_b ") or any(r["label"] == label and r["seed"] == seed for r in rows):
                    continue
                row = {"label": label, "seed": seed, "epochs": args.epochs, **evaluate(label, ckpts[label],
                                                                                       args.data_root),
                       "seconds": time.perf_counter() - t1}
                rows.append(row)
                with partial.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{label:<32} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                 if isinstance(v, float)), file=sys.stderr, flush=True)
    rows = [r for r in rows if r["seed"] in seeds]
    md = report(rows, seeds, args.epochs)
    meta = {"seeds": seeds, "epochs": args.epochs, "eps": EPS, "torch": torch.__version__, "device": "cpu",
            "threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t0,
            "run_seconds": sum(r["seconds"] for r in rows),  # train + evaluate, summed over the rows' runs
            "command": "python benchmarks/defense_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "claims": claims(rows), "runs": rows}, indent=2))
    out.with_suffix(".md").write_text(md)
    plot(rows, out.with_suffix(".png"), f"pre-processing defenses, digits twins, {args.epochs} epochs, seeds {seeds}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
