"""The command lines of ``atscale train``, ``atscale eval``, ``atscale export`` and ``atscale plan``, parsed without
torch or timm.

``atscale --help``, each command's ``--help`` and every bad argument answer at once; the commands import their heavy
entries (:mod:`atscale.train`, :mod:`atscale.evaluate`) only after their arguments parsed. A bad argument is a
:class:`ConfigError` (one line, exit status 2). Imports only the standard library and :mod:`atscale.errors`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import NoReturn, Sequence

from atscale.errors import ConfigError

# flag -> the config key it sets (values given as YAML, like any override)
_ALIASES = {"suite": "eval.suite", "eps": "eval.eps", "step": "eval.step", "targeted": "eval.targeted",
            "max_images": "eval.max_images", "data": "data.root", "out": "eval.out", "device": "run.device",
            "bn_domain": "eval.bn_domain", "seed": "eval.seed", "weights": "eval.weights",
            "shift_root": "eval.shift.roots", "shift_layout": "eval.shift.layouts",
            "mce_baseline": "eval.shift.mce_baseline", "shift_cache": "eval.shift.cache",
            "shift_max_images": "eval.shift.max_images", "shift_crop_ratio": "eval.shift.crop_ratio",
            "shift_write_mode": "eval.shift.write_mode", "preprocess": "eval.preprocess",
            "jpeg_root": "eval.jpeg_root", "image_list": "eval.image_list"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises :class:`ConfigError` (one line) instead of printing the usage
    and exiting; ``--help`` still prints and exits 0."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message, f"see `{self.prog} --help`")


@dataclass
class TrainArgs:
    """``atscale train``'s command line: the config file, the twin and the overrides (``--resume`` included)."""

    config: str | None = None
    twin: str | None = None
    overrides: list[str] = field(default_factory=list)


def train_parser() -> ArgumentParser:
    p = ArgumentParser(prog="atscale train", description="Adversarial training with PGD in the loop.")
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml)")
    p.add_argument("--resume", help="'auto' (last checkpoint of this run, if any) or a checkpoint path")
    p.add_argument("--twin", choices=["digits"], help="run the preset's small-scale twin (atscale.config.twins): same "
                   "protocol on the embedded digits data with a narrow network, minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. attack.eps=8 optim.lr=0.2")
    return p


def parse_train(argv: Sequence[str]) -> TrainArgs:
    args, extra = train_parser().parse_known_args(list(argv))
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option(s) {bad}", "use --config, --resume, --twin and section.key=value overrides")
    overrides = list(args.overrides) + extra
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    return TrainArgs(args.config, args.twin, overrides)


def add_eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("ckpt", nargs="?", help="checkpoint (.pt); same as --checkpoint")
    e.add_argument("overrides", nargs="*", help="eval.* / data.* / run.* / log.* / perf.* overrides, e.g. eval.eps=8")
    e.add_argument("--checkpoint")
    e.add_argument("--suite", help="run (the run's own PGD-k list, default) | quick | fd | robustbench | full | "
                                   "defense | unseen, or a .yaml/.json file of attack rows  [eval.suite]")
    e.add_argument("--attacks", help="the run suite's PGD-k list, e.g. pgd10,pgd100  [eval.steps]")
    e.add_argument("--eps", type=float, help="budget in 0..255 pixel units  [eval.eps]")
    e.add_argument("--step", type=float, help="PGD step in 0..255 units; PGD-k steps by max(step, eps/k)  [eval.step]")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--targeted", dest="targeted", action="store_true", default=None, help="[eval.targeted]")
    g.add_argument("--untargeted", dest="targeted", action="store_false")
    e.add_argument("--max-images", type=int, help="[eval.max_images]")
    e.add_argument("--data", help="FFCV dataset folder (default: the run's)  [data.root]")
    e.add_argument("--out", help="output folder (default: <run>/eval/<suite>)  [eval.out]")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[run.device]")
    e.add_argument("--bn-domain", help="Mixture BN models: the BN domain to evaluate  [eval.bn_domain]")
    e.add_argument("--weights", choices=["auto", "raw", "ema"], help="[eval.weights]")
    e.add_argument("--seed", type=int, help="attack seed (default: the run's)  [eval.seed]")
    e.add_argument("--shift-root", action="append", help="a distribution-shift test set folder (repeatable)  "
                                                         "[eval.shift.roots]")
    e.add_argument("--shift-layout", action="append", choices=["folder", "imagenet-c", "imagenet-a", "stylized"],
                   help="layout of each --shift-root (one for all, or one per root)  [eval.shift.layouts]")
    e.add_argument("--mce-baseline", help="ImageNet-C baseline errors: YAML/JSON file or 'alexnet'")
    e.add_argument("--shift-cache", help="folder for the shift sets' .beton files (default: <out>/shift_cache)")
    e.add_argument("--shift-max-images", type=int, help="per test set (per corruption and severity)")
    e.add_argument("--shift-crop-ratio", type=float, help="center-crop ratio (default: 1.0 for imagenet-c, else the "
                                                           "run's data.val_crop_ratio)")
    e.add_argument("--shift-write-mode", choices=["jpg", "raw", "smart"])
    e.add_argument("--preprocess", choices=["ffcv", "Res256Crop224", "BicubicRes256Crop224", "Crop288", "Res224",
                                            "none"],
                   help="ffcv (the run's val .beton) or RobustBench's pre-processing of the val JPEGs  "
                        "[eval.preprocess]")
    e.add_argument("--jpeg-root", help="ImageFolder of val JPEGs (default: <data.src>/val)  [eval.jpeg_root]")
    e.add_argument("--image-list", help="RobustBench's ImageNet subset list, e.g. imagenet_test_image_ids.txt  "
                                        "[eval.image_list]")
    e.add_argument("--no-progress", action="store_true", help="[log.progress=false]")


def _attack_steps(args: argparse.Namespace) -> list[int]:
    steps = []
    for name in filter(None, (t.strip() for t in args.attacks.split(","))):
        if not (name.startswith("pgd") and name[3:].isdigit() and int(name[3:]) >= 1):
            raise ConfigError(f"--attacks: unknown attack '{name}'", "give pgd<k> with k >= 1, e.g. pgd10,pgd100, "
                                                                    "or use --suite for other attacks")
        steps.append(int(name[3:]))
    if not steps:
        raise ConfigError("--attacks is empty", "give e.g. pgd10,pgd100")
    if args.suite not in (None, "", "run"):
        raise ConfigError("--attacks sets the run suite's PGD-k list, but --suite names another suite",
                          "give one of them")
    return steps


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The flags as ``key=value`` overrides (before the explicit ones, which win)."""
    out = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in _ALIASES.items()
           if getattr(args, flag) is not None]
    if args.attacks is not None:
        out.append(f"eval.steps={json.dumps(_attack_steps(args))}")
    if args.no_progress:
        out.append("log.progress=false")
    return out + list(args.overrides)


def checkpoint_arg(args: argparse.Namespace) -> str:
    if args.ckpt and "=" in args.ckpt and not args.checkpoint:
        raise ConfigError(f"'{args.ckpt}' looks like an override, not a checkpoint", "give the checkpoint first: "
                                                                                     "atscale eval CKPT key=value")
    ckpt = args.checkpoint or args.ckpt
    if not ckpt:
        raise ConfigError("no checkpoint given", "atscale eval CKPT [--suite quick] (or --checkpoint CKPT)")
    if args.checkpoint and args.ckpt and args.checkpoint != args.ckpt:
        if "=" in args.ckpt:
            args.overrides.insert(0, args.ckpt)
            return args.checkpoint
        raise ConfigError(f"two checkpoints given ({args.ckpt} and --checkpoint {args.checkpoint})", "give one")
    return ckpt


def parse_eval(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``atscale eval``'s command line -> (checkpoint, ``key=value`` overrides)."""
    p = ArgumentParser(prog="atscale eval", description="Robustness of a checkpoint.")
    add_eval_arguments(p)
    args = p.parse_intermixed_args(list(argv))
    ckpt = checkpoint_arg(args)
    return ckpt, overrides_of(args)


def parse_export(argv: Sequence[str]) -> argparse.Namespace:
    """``atscale export``'s command line: ``checkpoint``, ``out``, ``bn_domain``, ``eval_json``."""
    p = ArgumentParser(prog="atscale export", description="Export a checkpoint to a timm folder.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bn-domain", default="", help="Mixture BN models: the BN domain kept as plain BN")
    p.add_argument("--eval-json", default="", help="eval.json whose accuracies go into robustbench_model_info.json "
                                                   "(default: the newest atscale eval of this checkpoint)")
    return p.parse_args(list(argv))


@dataclass
class PlanArgs:
    """``atscale plan``'s command line (:mod:`atscale.planning`)."""

    config: str
    overrides: list[str]
    gpus: int
    kinds: list[str]
    mfu: float | None
    images: int | None
    measure: bool
    measure_batch: int
    measure_steps: int
    json: bool


def plan_parser() -> ArgumentParser:
    p = ArgumentParser(prog="atscale plan", description="Time and cost of a training preset: counted FLOPs per image "
                       "(attack and update passes, per data.phases phase), images/s per GPU kind at an assumed MFU, "
                       "GPU-hours and wall time on N GPUs (linear scaling), and the paper's published cost.")
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/imagenet/r152_iat.yaml)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the run uses (default 8); wall time = GPU-hours / N")
    p.add_argument("--gpu-kind", action="append", default=[], help="a100 | h100 | h200 | v100 | l40s | ... "
                   "(repeatable or comma list; default: every kind of atscale.planning.GPU_KINDS)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilization assumed (default: the GPU result of "
                   "benchmarks/mfu.py in benchmarks/results/ if any, else 0.35)")
    p.add_argument("--images", type=int, help="training images per epoch (default: meta.json of data.root, else "
                   "the source's train split, 1,281,167 for ImageNet-1k)")
    p.add_argument("--measure", action="store_true", help="also time a few real training steps on this machine")
    p.add_argument("--measure-batch", type=int, default=0, help="batch of --measure (0: per-GPU batch on CUDA, 2 on "
                   "CPU)")
    p.add_argument("--measure-steps", type=int, default=3, help="timed steps of --measure (after one untimed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. attack.iters=10")
    return p


def parse_plan(argv: Sequence[str]) -> PlanArgs:
    """``atscale plan``'s command line; counts and the MFU are range-checked here."""
    a = plan_parser().parse_intermixed_args(list(argv))
    checks = [(a.gpus >= 1, f"--gpus {a.gpus} is not a GPU count", "give --gpus 1 or more"),
              (a.mfu is None or 0 < a.mfu <= 1, f"--mfu {a.mfu} is not a utilization",
               "give a fraction in (0, 1], e.g. --mfu 0.35"),
              (a.images is None or a.images >= 1, f"--images {a.images} is not a dataset size", "give 1 or more"),
              (a.measure_batch >= 0 and a.measure_steps >= 1, "--measure-batch must be >= 0 and --measure-steps >= 1",
               "e.g. --measure-batch 2 --measure-steps 3")]
    for ok, problem, fix in checks:
        if not ok:
            raise ConfigError(problem, fix)
    kinds = [k.strip().lower() for item in a.gpu_kind for k in item.split(",") if k.strip()]
    return PlanArgs(a.config, list(a.overrides), a.gpus, kinds, a.mfu, a.images, a.measure, a.measure_batch,
                    a.measure_steps, a.json)


def dense_parser() -> ArgumentParser:
    """``atscale dense train | eval | dag | transfer`` (Xie thesis Ch. 2: segmentation / detection and DAG)."""
    p = ArgumentParser(prog="atscale dense", description="Dense tasks (segmentation, detection) and Dense Adversary "
                       "Generation (Xie thesis Ch. 2) on the embedded scenes or Pascal VOC.")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a torchvision segmentation / detection model (configs/dense/)")
    t.add_argument("--config", help="YAML file of data / model / optim / dag / run sections")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=2")
    e = sub.add_parser("eval", help="clean mIoU (segmentation) or mAP@0.5 (detection) of a run on its val images")
    e.add_argument("run", help="run folder of `atscale dense train`")
    d = sub.add_parser("dag", help="DAG on a run's val images: clean / DAG / PERM metric, perceptibility, iterations; "
                                   "writes RUN/dag/")
    d.add_argument("run", help="run folder of `atscale dense train`")
    d.add_argument("overrides", nargs="*", help="dag.key=value, e.g. dag.max_iters=50 dag.images=32")
    d.add_argument("--out", help="output folder (default RUN/dag); e.g. RUN/dag_gamma2 for another dag.gamma")
    d.add_argument("--no-progress", action="store_true")
    x = sub.add_parser("transfer", help="a run's metric on its val images plus other runs' DAG perturbations (summed "
                                        "when several: r_A + r_B), optionally permuted")
    x.add_argument("target", help="run folder of the attacked model")
    x.add_argument("--perturbation", action="append",
                   help="a run folder attacked by `atscale dense dag`, a `dag --out` folder or a perturbations.pt; "
                        "repeat to sum")
    x.add_argument("--images", type=int, default=0, help="score the first N val images only (without "
                   "--perturbation: the clean metric on them)")
    x.add_argument("--permute", action="store_true", help="permute rows and columns of the summed r (PERM control)")
    x.add_argument("--seed", type=int, default=0)
    return p


def parse_dense(argv: Sequence[str]) -> argparse.Namespace:
    args = dense_parser().parse_args(list(argv))
    for ov in getattr(args, "overrides", []):
        if "=" not in ov:
            raise ConfigError(f"'{ov}' is not a section.key=value override", "write e.g. optim.epochs=2")
    return args


__all__ = ["ArgumentParser", "dense_parser", "parse_dense", "TrainArgs", "train_parser", "parse_train", "add_eval_arguments", "overrides_of",
           "checkpoint_arg", "parse_eval", "parse_export", "PlanArgs",
           "plan_parser", "parse_plan"]
