"""``atscale`` command line: data | train | eval | export | plan | dense. Thin: each subcommand parses its arguments without
torch (:mod:`atscale.cli_args`), then calls one library entry (:mod:`atscale.train`, :mod:`atscale.evaluate`,
:mod:`atscale.data`, :mod:`atscale.planning`), so ``--help`` and bad arguments answer at once. Every
:class:`atscale.errors.AtscaleError`, bad arguments included, ends as one line on stderr and exit status 2. Top layer:
nothing imports it."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from atscale.cli_args import ArgumentParser, parse_dense, parse_eval, parse_export, parse_plan, parse_train
from atscale.errors import run_command

COMMANDS = ("data", "train", "eval", "export", "plan", "dense")


def _data(args: argparse.Namespace) -> None:
    from atscale.data import build_cifar10, build_digits, build_imagefolder

    if args.source == "digits":
        meta = build_digits(args.out, args.size, args.val_fraction, args.seed, args.workers)
    elif args.source == "cifar10":
        meta = build_cifar10(args.src, args.out, args.workers)
    else:
        meta = build_imagefolder(args.src, args.out, args.max_resolution, args.jpeg_quality, args.workers,
                                 args.write_mode)
    skipped = meta["skipped"]
    summary = {k: meta[k] for k in ("source", "num_classes", "n_train", "n_val")}
    summary["skipped"] = skipped["count"]
    print(json.dumps(summary))
    for s in skipped["files"][:20]:
        print(f"skipped {s['file']}: {s['error']}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="atscale", description="Adversarial training of image classifiers at scale.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="write FFCV .beton files (train/val + meta.json)")
    dsub = d.add_subparsers(dest="source", required=True)
    dg = dsub.add_parser("digits", help="scikit-learn's bundled digits, upsampled to RGB (no download)")
    dg.add_argument("--size", type=int, default=32)
    dg.add_argument("--val-fraction", type=float, default=0.2)
    dg.add_argument("--seed", type=int, default=0)
    for name, hlp in (("imagefolder", "ImageNet-layout tree: <src>/train/<class>/*, <src>/val/<class>/*"),
                      ("imagenet", "alias of imagefolder"),
                      ("cifar10", "CIFAR-10 in torchvision's on-disk format (<src>/cifar-10-batches-py)")):
        sp = dsub.add_parser(name, help=hlp)
        sp.add_argument("--src", required=True)
        if name != "cifar10":
            sp.add_argument("--max-resolution", type=int, default=0, help="cap on the longest side, 0 = keep")
            sp.add_argument("--jpeg-quality", type=int, default=90)
            sp.add_argument("--write-mode", choices=["jpg", "raw", "smart"], default="jpg")
    for sp in dsub.choices.values():
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--workers", type=int, default=2)

    t = sub.add_parser("train", help="train with PGD in the loop (see configs/)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)

    sub.add_parser("eval", help="robustness of a checkpoint: the run's PGD-k list, a named suite (quick | fd | "
                                "robustbench | full | defense | file), distribution-shift test sets; eval.json, "
                                "eval.md, plots",
                   add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("export", help="export a checkpoint to a folder that timm.create_model('local-dir:...') loads",
                   add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("plan", help="time and cost of a preset: counted FLOPs per image, images/s per GPU kind, "
                                "GPU-hours and wall time on N GPUs, the paper's published cost",
                   add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("dense", help="segmentation / detection on the embedded scenes or Pascal VOC, and Dense "
                                 "Adversary Generation against them: train | eval | dag | transfer",
                   add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _train(argv: Sequence[str]) -> int:
    from atscale.config import load_config

    args = parse_train(argv)
    cfg = load_config(args.config, args.overrides, twin=args.twin)  # validated before torch is imported
    from atscale.train import train

    return train(cfg)


def _eval(argv: Sequence[str]) -> int:
    ckpt, overrides = parse_eval(argv)
    from atscale.evaluate import evaluate_checkpoint

    evaluate_checkpoint(ckpt, overrides)
    return 0


def _export(argv: Sequence[str]) -> int:
    args = parse_export(argv)
    from atscale.evaluate import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, bn_domain=args.bn_domain, eval_json=args.eval_json))
    return 0


def _plan(argv: Sequence[str]) -> int:
    a = parse_plan(argv)
    from atscale.planning import run_plan  # imports torch only to count

    return run_plan(a.config, a.overrides, a.gpus, a.kinds, a.mfu, a.images, a.measure, a.measure_batch,
                    a.measure_steps, a.json)


def _dense(argv: Sequence[str]) -> int:
    parse_dense(argv)  # bad arguments answer before torch is imported
    from atscale.dense import dense_cli

    return dense_cli(argv)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("train", "eval", "export", "plan", "dense"):  # REMAINDER drops leading options
        return {"train": _train, "eval": _eval, "export": _export, "plan": _plan, "dense": _dense}[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    if args.source == "imagenet":
        args.source = "imagefolder"
    _data(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (``--help``: 0, bad arguments or any AtscaleError: 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"atscale {argv[0]}" if argv and argv[0] in COMMANDS else "atscale"
    try:
        return run_command(prog, lambda: _dispatch(argv))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
