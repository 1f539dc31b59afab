"""The distributed world and the weight update (layer above models, attacks and data; below checkpoint, evaluation and
training): :mod:`.env` reads the world from torchrun or SLURM, joins the process group and offers the few collectives
the loops need; :mod:`.updater` holds the model's update engine (DDP or DeepSpeed ZeRO). Synchronized BN is a layer
(:mod:`atscale.layers.sync_bn`). Imports config, errors, models and layers only.
"""
from atscale.distributed.env import (DistEnv, all_reduce_sum, any_rank, backend_for, barrier, cleanup, expand_nodelist,
                                     init, is_dist, rank, resolve_device, world_size)

__all__ = ["DistEnv", "all_reduce_sum", "any_rank", "backend_for", "barrier", "cleanup", "expand_nodelist", "init",
           "is_dist", "rank", "resolve_device", "world_size"]
