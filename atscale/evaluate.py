"""``atscale eval`` / ``python -m atscale.evaluate CKPT [--suite NAME] [key=value ...]`` (the torchrun entry point) and
``atscale export``. Each flag is an alias of an ``eval.*`` / ``data.*`` / ``run.*`` / ``log.*`` override of the
checkpoint's config; the command line is parsed by :mod:`atscale.cli_args` (no torch needed for that), the work is
:mod:`atscale.evaluation.checkpoint_eval`'s. ``eval.preprocess`` other than ``ffcv`` evaluates the val JPEGs with
RobustBench's pre-processing (``eval.jpeg_root``, ``eval.image_list``); the export writes RobustBench's model info
beside the weights (``robustbench_model_info.json``, :mod:`atscale.evaluation.model_info`).
"""
from __future__ import annotations

import sys
from typing import Sequence

from atscale.cli_args import add_eval_arguments, checkpoint_arg, overrides_of, parse_eval, parse_export
from atscale.errors import run_command
from atscale.evaluation.checkpoint_eval import evaluate_checkpoint, export_checkpoint


def eval_cli(argv: Sequence[str]) -> int:
    evaluate_checkpoint(*parse_eval(argv))
    return 0


def export_cli(argv: Sequence[str]) -> int:
    args = parse_export(argv)
    print(export_checkpoint(args.checkpoint, args.out, bn_domain=args.bn_domain,
                            eval_json=args.eval_json))
    return 0


__all__ = ["evaluate_checkpoint", "export_checkpoint", "eval_cli", "export_cli", "add_eval_arguments",
           "overrides_of", "checkpoint_arg"]

if __name__ == "__main__":  # torchrun --nproc-per-node N -m atscale.evaluate CKPT --suite quick
    sys.exit(run_command("atscale eval", lambda: eval_cli(sys.argv[1:])))
