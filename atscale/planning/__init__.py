"""``atscale plan``: the compute a training preset needs: FLOPs per training image, images/s per GPU kind, GPU-hours
and wall time on N GPUs, and the published cost of the paper's own run where one is known.

- :mod:`~atscale.planning.phases`: the run's ``data.phases`` and the images each epoch trains on;
- :mod:`~atscale.planning.flops`: FLOPs per image counted by ``FlopCounterMode`` over the real parts of one training
  step on fake tensors (forward, attack = fixed + k x step, update; Xie thesis Sec 4.5's (2k + 3) / 3 for PGD-k);
- :mod:`~atscale.planning.gpus`: dense datasheet peaks per GPU kind, the MFU (``--mfu``, measured or assumed) and the
  papers' published costs;
- :mod:`~atscale.planning.measure`: ``--measure``, real training steps timed on this machine;
- :mod:`~atscale.planning.estimate`: :func:`plan`, :func:`format_plan` and :func:`run_plan` (the CLI entry).

Importing this package does not import torch (``atscale plan --help`` and argument errors stay fast).
"""
from __future__ import annotations

from atscale.planning.estimate import DEFAULT_GPUS, format_plan, plan, run_plan
from atscale.planning.flops import count_flops, count_phase
from atscale.planning.gpus import (DEFAULT_MFU, GPU_KINDS, PUBLISHED_COSTS, GpuKind, PublishedCost, check_kinds,
                                   measured_mfu)
from atscale.planning.measure import measure_phase
from atscale.planning.phases import PhaseCost, PhaseSpec, dataset_images, epoch_images, phases_of

__all__ = ["GPU_KINDS", "GpuKind", "PUBLISHED_COSTS", "PublishedCost", "PhaseSpec", "PhaseCost", "DEFAULT_MFU",
           "DEFAULT_GPUS", "phases_of", "dataset_images", "count_flops", "count_phase", "measure_phase",
           "measured_mfu", "epoch_images", "check_kinds", "plan", "format_plan", "run_plan"]
