"""``atscale`` command line: data | train | eval | export. Thin: each subcommand calls one library function."""
from __future__ import annotations

import argparse
import json
import sys

from atscale.checkpoint import CheckpointError
from atscale.config import ConfigError
from atscale.data.sources import DatasetError
from atscale.models import ModelError


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
    p = argparse.ArgumentParser(prog="atscale", description="Adversarial training of image classifiers at scale.")
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

    e = sub.add_parser("eval", help="clean and PGD-k accuracy of a checkpoint; writes eval.json and a plot")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--attacks", help="comma list, e.g. pgd10,pgd100 (default: the run's eval.steps)")
    e.add_argument("--eps", type=float, help="budget in 0..255 pixel units")
    e.add_argument("--step", type=float, help="step size in 0..255 units, 0 = eps/k")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--targeted", dest="targeted", action="store_true", default=None)
    g.add_argument("--untargeted", dest="targeted", action="store_false")
    e.add_argument("--max-images", type=int)
    e.add_argument("--data", help="FFCV dataset folder (default: the run's data.root)")
    e.add_argument("--out", help="folder for eval.json and the plot (default: the run folder)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--bn-domain", help="Mixture BN models: the BN domain to evaluate (e.g. clean or adv)")

    x = sub.add_parser("export", help="export a checkpoint to a folder that timm.create_model('local-dir:...') loads")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--bn-domain", help="Mixture BN models: the BN domain kept as plain BN (default: model.eval_domain)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # argparse's REMAINDER drops leading options, so train parses its own
        args = argparse.Namespace(cmd="train", rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.cmd == "data":
            if args.source == "imagenet":
                args.source = "imagefolder"
            _data(args)
        elif args.cmd == "train":
            from atscale.train import cli as train_cli

            return train_cli(args.rest)
        elif args.cmd == "eval":
            from atscale.evaluate import eval_checkpoint

            eval_checkpoint(args.checkpoint, attacks=args.attacks, eps=args.eps, step=args.step,
                            targeted=args.targeted, max_images=args.max_images, data_root=args.data, out=args.out,
                            device=args.device, bn_domain=args.bn_domain)
        elif args.cmd == "export":
            from atscale.evaluate import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.out, bn_domain=args.bn_domain))
    except (ConfigError, DatasetError, CheckpointError, ModelError) as err:
        print(f"atscale {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
