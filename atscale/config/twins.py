"""Small-scale twins of the published protocols in ``configs/imagenet/`` and ``configs/cifar10/``.

A twin keeps everything that defines a protocol: the objective, the training attack (norm, eps, step, iterations,
targets, starts), the architecture family and its paper elements (activation, denoising blocks, BN domains, BN
momentum; for ConvNeXt / Swin / ViT / XCiT the ConvStem, LayerScale, drop path, dropout, patch dropout and token
settings: every ``model.kwargs`` entry but the sizes ``_twin_model`` lists), the optimizer, the shape of the
learning-rate schedule, AutoAugment and the evaluation attack. It scales the rest to the embedded digits data (32 px,
scikit-learn's digits, no download) and a network narrow enough to train on a laptop CPU in minutes:
``atscale train --config configs/imagenet/r152_iat.yaml --twin digits``. Training phases keep their fractions of
training, their attack and token-drop settings, and sizes relative to 32 px, under one batch size.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from atscale.config.schema import Config
from atscale.errors import ConfigError

TWIN_EPOCHS = 8
_RESNET_TWIN = {"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]}
_GROUPNORM_CHANNELS = [32, 64, 128, 256]  # timm's GroupNorm uses 32 groups
_KEEP_EFFNET_KWARGS = ("drop_rate", "drop_path_rate", "act_layer")
# the size arguments a twin overrides; everything else in model.kwargs (drop_path_rate, drop_rate, ls_init_value,
# conv_mlp, init_values, class_token, global_pool, patch_drop_rate, eta, stem_ratios ...) is the preset's
_CONVNEXT_TWIN = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
_SWIN_TWIN = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2],
              "num_heads": [1, 2, 4, 8], "dynamic_img_size": True}
_VIT_TWIN = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "dynamic_img_size": True}
_XCIT_TWIN = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
_VIT_PREFIXES = ("vit_", "deit_", "deit3_", "test_vit")
_MIN_SIZE = {"convnext": 32}  # 4x4 stem + three stride-2 stages: the last stage needs a 32 px input


def _family(arch: str) -> str:
    if "efficientnet" in arch:
        return "efficientnet"
    if arch.startswith("convnext") or arch.startswith("test_convnext"):
        return "convnext"
    if arch.startswith("swin_"):
        return "swin"
    if arch.startswith(_VIT_PREFIXES):
        return "vit"
    if arch.startswith("xcit_"):
        return "xcit"
    if "resne" in arch:
        return "resnet"
    if arch == "vgg_small":
        return "vgg_small"
    return ""


def _twin_model(cfg: Config) -> None:
    """The tiny network of a twin, same family and paper elements (module docstring).

    ResNet / ResNeXt / WideResNet (timm ``wide_resnet50_2``: its ``base_width=128`` stays, so the bottlenecks stay
    2x wider than a ResNet twin's) and atscale's variants: one block per stage, 16..128 channels. EfficientNet: timm's
    ``test_efficientnet``. ConvNeXt (also ``convnext_*_convstem``, Singh et al. 2023: the stem's widths are relative
    to ``dims[0]``, so it shrinks with the twin): one block per stage, 16..128 channels. Swin: 4 px patches, 4 px
    windows (shifted in the 8x8 first stage), 16..128 channels, 2 blocks per stage. ViT / DeiT / DeiT-III: 8 px
    patches, width 64, 2 blocks, 2 heads, ``dynamic_img_size`` so phases can change the resolution. XCiT: 8 px patches
    (its conv patch embedding takes 8 or 16), width 32, 2 blocks, 4 heads, its 2 class-attention layers. vgg_small
    (f_b of the adversarial transformation): a quarter of its widths.
    """
    arch, kwargs = cfg.model.arch, dict(cfg.model.kwargs)
    family = _family(arch)
    kwargs.pop("grad_checkpointing", None)
    if family == "efficientnet":
        cfg.model.arch = "test_efficientnet"  # timm's tiny EfficientNet (same blocks: MBConv, SE, SiLU, BN)
        kwargs = {k: v for k, v in kwargs.items() if k in _KEEP_EFFNET_KWARGS}
    elif family == "resnet":
        kwargs.update(_RESNET_TWIN)
        if "group" in str(kwargs.get("norm_layer", "")).lower():
            kwargs["channels"] = _GROUPNORM_CHANNELS
    elif family == "vgg_small":
        kwargs["widths"] = _quarter(kwargs.get("widths", (32, 64, 128)))
    elif family:
        kwargs.update({"convnext": _CONVNEXT_TWIN, "swin": _SWIN_TWIN, "vit": _VIT_TWIN, "xcit": _XCIT_TWIN}[family])
    else:
        raise ConfigError(f"no digits twin for model.arch = '{arch}'",
                          "twins exist for ResNet / ResNeXt / WideResNet (including atscale's registered variants), "
                          "EfficientNet, ConvNeXt (and _convstem), Swin, ViT / DeiT, XCiT and vgg_small presets")
    cfg.model.kwargs = kwargs
    cfg.model.mean, cfg.model.std, cfg.model.num_classes = [0.5] * 3, [0.5] * 3, 0


FINE_TUNING_DIGITS = [5, 6, 7, 8, 9]


def _twin_source(t: Config, source: str) -> str:
    """A weights source inside a run folder, ``runs/<name>/...``, becomes ``runs/<name>_digits/...``: the twin run of
    that preset (train it first with ``--twin digits``)."""
    if not source:
        return source
    prefix = "local-dir:" if source.startswith("local-dir:") else ""
    path = Path(source[len(prefix):])
    parts = path.parts
    runs = t.run.out_dir.rstrip("/").split("/")[-1] or "runs"
    if runs in parts and parts.index(runs) + 1 < len(parts):
        i = parts.index(runs) + 1
        path = Path(*parts[:i], f"{parts[i]}_digits", *parts[i + 1:])
    return f"{prefix}{path}"


def _fine_tuning_twin(t: Config, root: str) -> None:
    """A fine-tuning preset's twin fine-tunes the twin of its source (:func:`_twin_source`) on a new task, the digits
    5-9 (a 5-class head)."""
    if not t.model.init_from or t.defense.preprocessor:
        return
    t.model.init_from = _twin_source(t, t.model.init_from)
    t.data.digits_classes = list(FINE_TUNING_DIGITS)
    t.data.root = f"{root}_{FINE_TUNING_DIGITS[0]}to{FINE_TUNING_DIGITS[-1]}"
    t.model.freeze = []  # the source's parameter names differ from the twin's


# the size arguments of the pre-processor networks a defense twin divides by 4 (atscale.models.preprocessors)
_PREPROCESSOR_SIZES = ("channels", "growth", "widths", "code")


def _quarter(value):
    return [max(4, int(v) // 4) for v in value] if isinstance(value, (list, tuple)) else max(4, int(value) // 4)


def _defense_twin(t: Config, family: str) -> None:
    """A defense preset's twin: the same pre-processor with a quarter of the widths (NRP keeps its block count), f_b
    with a quarter of its widths, the target / f_b / pre-processor sources mapped to their twin runs
    (:func:`_twin_source`), and a ResNet feature layer ``layerN.<i>.<conv>`` moved to the twin's one block per stage,
    ``layerN.0.<conv>`` (JATP Eq. 5: the last convolution of that stage stays the tapped one)."""
    d = t.defense
    if not d.preprocessor:
        return
    t.model.init_from = _twin_source(t, t.model.init_from)
    d.init_from, d.base_from = _twin_source(t, d.init_from), _twin_source(t, d.base_from)
    d.kwargs = {k: _quarter(v) if k in _PREPROCESSOR_SIZES else v for k, v in d.kwargs.items()}
    if d.preprocessor == "adv_transform":
        d.base_kwargs = {**d.base_kwargs, "widths": _quarter(d.base_kwargs.get("widths", (32, 64, 128)))}
    if family == "resnet":
        d.feature_layer = re.sub(r"^(layer\d+)\.\d+\.", r"\1.0.", d.feature_layer)


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
        size = max(_MIN_SIZE.get(_family(cfg.model.arch), 16),
                   8 * round(ph.get("image_size", base_size) * 32 / base_size / 8))
        if until > last:
            kept = {k: v for k, v in ph.items() if k not in ("until_epoch", "image_size", "batch_size")}
            phases.append({"until_epoch": until, "image_size": size, **kept})
            last = until
    if phases:
        phases[-1]["until_epoch"] = TWIN_EPOCHS
    d.phases = phases
    _fine_tuning_twin(t, root)
    _defense_twin(t, _family(cfg.model.arch))
    e = t.eval
    e.preprocess, e.jpeg_root, e.image_list = "ffcv", "", ""  # digits have no val JPEGs
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
