"""``atscale`` command line: data | train | eval | export. Thin: each subcommand calls one library function."""
from __future__ import annotations

import argparse
import json
import sys

from atscale.checkpoint import CheckpointError
from atscale.config import ConfigError
from atscale.data.sources import DatasetError
from atscale.engine import TrainingDiverged
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


def _shift_pairs(roots: list[str], layouts: list[str]) -> list[tuple[str, str]]:
    if not roots:
        if layouts:
            raise ConfigError("--shift-layout needs --shift-root")
        return []
    if len(layouts) == 1:
        layouts = layouts * len(roots)
    if len(layouts) != len(roots):
        raise ConfigError(f"give one --shift-layout for all --shift-root folders or one per folder (got "
                          f"{len(layouts)} for {len(roots)})")
    return list(zip(roots, layouts))


def _eval(args: argparse.Namespace) -> None:
    from atscale.evaluate import eval_checkpoint

    ckpt = args.checkpoint or args.ckpt
    if not ckpt:
        raise ConfigError("give the checkpoint: atscale eval CKPT [--suite quick] (or --checkpoint CKPT)")
    if args.checkpoint and args.ckpt and args.checkpoint != args.ckpt:
        raise ConfigError(f"two checkpoints given ({args.ckpt} and --checkpoint {args.checkpoint}); give one")
    shift = _shift_pairs(args.shift_root, args.shift_layout)
    extra = {}
    if args.suite or shift:
        extra = dict(mce_baseline=args.mce_baseline, shift_cache=args.shift_cache,
                     shift_max_images=args.shift_max_images, shift_crop_ratio=args.shift_crop_ratio,
                     shift_write_mode=args.shift_write_mode, seed=args.seed)
    elif args.mce_baseline or args.seed is not None:
        raise ConfigError("--mce-baseline and --seed apply to --suite / --shift-root evaluations")
    eval_checkpoint(ckpt, attacks=args.attacks, eps=args.eps, step=args.step, targeted=args.targeted,
                    max_images=args.max_images, data_root=args.data, out=args.out, device=args.device,
                    bn_domain=args.bn_domain, progress=not args.no_progress, suite=args.suite, shift=shift, **extra)


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

    e = sub.add_parser("eval", help="robustness of a checkpoint: PGD-k list, a named suite (quick | fd | robustbench | "
                                    "full | file), distribution-shift test sets; eval.json, eval.md and plots")
    e.add_argument("ckpt", nargs="?", help="checkpoint (.pt); same as --checkpoint")
    e.add_argument("--checkpoint")
    e.add_argument("--attacks", help="comma list, e.g. pgd10,pgd100 (default: the run's eval.steps)")
    e.add_argument("--suite", help="quick | fd | robustbench | full, or a .yaml/.json file of attack specs")
    e.add_argument("--eps", type=float, help="budget in 0..255 pixel units")
    e.add_argument("--step", type=float, help="step size in 0..255 units, 0 = eps/k")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--targeted", dest="targeted", action="store_true", default=None)
    g.add_argument("--untargeted", dest="targeted", action="store_false")
    e.add_argument("--max-images", type=int)
    e.add_argument("--data", help="FFCV dataset folder (default: the run's data.root)")
    e.add_argument("--out", help="output folder (default: the run folder; with --suite <run>/eval/<suite>)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--bn-domain", help="Mixture BN models: the BN domain to evaluate (e.g. clean or adv)")
    e.add_argument("--seed", type=int, help="attack seed (default: the run's seed)")
    e.add_argument("--shift-root", action="append", default=[],
                   help="a distribution-shift test set folder (repeatable)")
    e.add_argument("--shift-layout", action="append", default=[],
                   choices=["folder", "imagenet-c", "imagenet-a", "stylized"],
                   help="layout of each --shift-root (one for all, or one per root)")
    e.add_argument("--mce-baseline", help="ImageNet-C baseline errors: YAML/JSON file or 'alexnet'")
    e.add_argument("--shift-cache", help="folder for the shift sets' .beton files (default: <out>/shift_cache)")
    e.add_argument("--shift-max-images", type=int, default=0, help="per test set (per corruption and severity)")
    e.add_argument("--shift-crop-ratio", type=float, help="center-crop ratio (default: 1.0 for imagenet-c, else "
                                                           "the run's data.val_crop_ratio)")
    e.add_argument("--shift-write-mode", choices=["jpg", "raw", "smart"], default="jpg")
    e.add_argument("--no-progress", action="store_true")

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
            _eval(args)
        elif args.cmd == "export":
            from atscale.evaluate import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.out, bn_domain=args.bn_domain))
    except (ConfigError, DatasetError, CheckpointError, ModelError, TrainingDiverged) as err:
        print(f"atscale {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
