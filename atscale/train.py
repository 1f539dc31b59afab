"""``atscale train`` / ``python -m atscale.train --config ... [key.sub=value ...]`` (the torchrun entry point).

The public entry of training, and all that ``launch/`` imports: ``main(cfg)`` (every rank calls it),
``load_config``, ``ConfigError`` and ``request_stop`` / ``install_stop_handler`` / ``clear_stop`` for launchers. The work is :mod:`atscale.training`'s.
"""
from __future__ import annotations

import argparse
import sys

from atscale.config import load_config
from atscale.errors import ConfigError, run_command
from atscale.training.fit import main
from atscale.training.preempt import clear as clear_stop
from atscale.training.preempt import install_handler as install_stop_handler
from atscale.training.preempt import request_stop


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="atscale train", description="Adversarial training with PGD in the loop.")
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml)")
    p.add_argument("--resume", help="'auto' (last checkpoint of this run, if any) or a checkpoint path")
    p.add_argument("--twin", choices=["digits"], help="run the preset's small-scale twin (atscale.config.twins): same "
                   "protocol on the embedded digits data with a narrow network, minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. attack.eps=8 optim.lr=0.2")
    return p.parse_known_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        raise ConfigError(f"atscale train: unknown option(s) {bad}", "use --config, --resume, --twin and "
                                                                     "section.key=value overrides")
    overrides = list(args.overrides) + extra
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    main(load_config(args.config, overrides, twin=args.twin))
    return 0


__all__ = ["main", "cli", "load_config", "ConfigError", "request_stop", "install_stop_handler", "clear_stop"]

if __name__ == "__main__":
    sys.exit(run_command("atscale train", lambda: cli(sys.argv[1:])))
