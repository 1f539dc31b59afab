"""Small-scale twins of the published protocols in ``configs/imagenet/``.

A twin keeps everything that defines a protocol: the objective, the training attack (norm, eps, step, iterations,
targets, starts), the architecture family and its paper elements (activation, denoising blocks, BN domains, BN
momentum), the optimizer, the shape of the learning-rate schedule, AutoAugment and the evaluation attack. It scales the
rest to the embedded digits data (32 px, scikit-learn's digits, no download) and a network narrow enough to train on a
laptop CPU in minutes: ``atscale train --config configs/imagenet/r152_iat.yaml --twin digits``.
"""
from __future__ import annotations

import copy

from atscale.config.schema import Config
from atscale.errors import ConfigError

TWIN_EPOCHS = 8
_RESNET_TWIN = {"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]}
_GROUPNORM_CHANNELS = [32, 64, 128, 256]  # timm's GroupNorm uses 32 groups
_KEEP_EFFNET_KWARGS = ("drop_rate", "drop_path_rate", "act_layer")


def _twin_model(cfg: Config) -> None:
    arch, kwargs = cfg.model.arch, dict(cfg.model.kwargs)
    if "efficientnet" in arch:
        cfg.model.arch = "test_efficientnet"  # timm's tiny EfficientNet (same blocks: MBConv, SE, SiLU, BN)
        cfg.model.kwargs = {k: v for k, v in kwargs.items() if k in _KEEP_EFFNET_KWARGS}
    elif "resne" in arch:
        kwargs.update(_RESNET_TWIN)
        if "group" in str(kwargs.get("norm_layer", "")).lower():
            kwargs["channels"] = _GROUPNORM_CHANNELS
        kwargs.pop("grad_checkpointing", None)
        cfg.model.kwargs = kwargs
    else:
        raise ConfigError(f"no digits twin for model.arch = '{arch}': twins exist for ResNet / ResNeXt (including "
                          "atscale's registered variants) and EfficientNet presets")
    cfg.model.mean, cfg.model.std, cfg.model.num_classes = [0.5] * 3, [0.5] * 3, 0


def digits_twin(cfg: Config, root: str = "data/digits") -> Config:
    """The digits-scale twin of ``cfg`` (a copy): protocol kept, data / width / depth / epochs scaled down."""
    t = copy.deepcopy(cfg)
    d = t.data
    base_size = d.image_size
    d.source, d.root, d.src, d.build_if_missing = "digits", root, "", True
    d.batch_size, d.eval_batch_size = 64, 200
    d.image_size = d.val_size = 32
    d.val_crop_ratio, d.train_crop, d.rrc_scale, d.flip = 1.0, "random_resized", [0.6, 1.0], False
    d.num_workers = 2
    _twin_model(t)
    s = t.schedule
    scale = TWIN_EPOCHS / s.epochs
    s.epochs = TWIN_EPOCHS
    s.warmup_epochs = min(1.0, s.warmup_epochs)
    s.milestones = [round(m * scale, 3) for m in s.milestones]
    if s.bn_eval_last_epochs:
        s.bn_eval_last_epochs = max(1, round(s.bn_eval_last_epochs * scale))
    s.decay_every_epochs = max(0.05, s.decay_every_epochs * scale)
    phases, last = [], 0
    for ph in d.phases:  # progressive resizing: same fractions of training, sizes relative to 32 px, one batch size
        until = min(TWIN_EPOCHS, max(last + 1, round(ph["until_epoch"] * scale)))
        size = max(16, 8 * round(ph.get("image_size", base_size) * 32 / base_size / 8))
        if until > last:
            phases.append({"until_epoch": until, "image_size": size})
            last = until
    if phases:
        phases[-1]["until_epoch"] = TWIN_EPOCHS
    d.phases = phases
    e = t.eval
    e.steps = sorted({min(k, 20) for k in e.steps})
    e.max_images, e.every_epochs, e.quick_images = 0, 2, 200
    e.quick_steps = min(e.quick_steps, 10)
    r = t.run
    r.name = f"{r.name}_digits"
    r.ckpt_every_steps, r.max_steps, r.resume = 0, 0, ""
    t.dist.grad_accum = 1
    return t


TWINS = {"digits": digits_twin}


def make_twin(cfg: Config, name: str) -> Config:
    if name not in TWINS:
        raise ConfigError(f"--twin {name!r} is unknown; available: {', '.join(TWINS)}")
    return TWINS[name](cfg)
