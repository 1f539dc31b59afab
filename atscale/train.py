"""``atscale train`` / ``python -m atscale.train --config ... [key.sub=value ...]`` (the torchrun entry point).

The public entry of training, and all that ``launch/`` imports: ``main(cfg)`` (every rank calls it), ``load_config``,
``ConfigError`` and ``request_stop`` / ``install_stop_handler`` / ``clear_stop`` for launchers. ``train(cfg)`` is the
command's run: SIGTERM, SIGUSR1, SIGUSR2 and SIGINT stop it at the next step with a checkpoint, and its exit status is
then 128 + the signal's number. The work is :mod:`atscale.training`'s; the command line is parsed by
:mod:`atscale.cli_args` (no torch needed for that).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from atscale.cli_args import parse_train
from atscale.config import Config, load_config
from atscale.errors import ConfigError, run_command
from atscale.training import preempt
from atscale.training.fit import main
from atscale.training.preempt import clear as clear_stop
from atscale.training.preempt import install_handler as install_stop_handler
from atscale.training.preempt import request_stop


def exit_status(result: Any) -> int:
    """0, or 128 + the signal's number when a signal stopped the run (so schedulers see an interrupted run)."""
    signum = preempt.stop_signal()
    stopped = isinstance(result, dict) and result.get("stopped") and result.get("reason") != "max_steps"
    return 128 + signum if stopped and signum is not None else 0


def train(cfg: Config) -> int:
    """``main(cfg)`` with SIGTERM, SIGUSR1, SIGUSR2 and SIGINT stopping it at the next step boundary (checkpoint
    saved, ``--resume auto`` continues); returns the exit status (:func:`exit_status`)."""
    clear_stop()
    with preempt.stop_on_signals("atscale train"):
        result = main(cfg)
    return exit_status(result)


def cli(argv: Sequence[str] | None = None) -> int:
    args = parse_train(sys.argv[1:] if argv is None else argv)
    return train(load_config(args.config, args.overrides, twin=args.twin))


__all__ = ["main", "cli", "train", "exit_status", "load_config", "ConfigError", "request_stop", "install_stop_handler",
           "clear_stop"]

if __name__ == "__main__":
    sys.exit(run_command("atscale train", lambda: cli(sys.argv[1:])))
