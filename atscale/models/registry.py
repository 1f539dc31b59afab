"""timm model variants of the papers' architectures, registered with ``timm.models.register_model``.

``import atscale.models.registry`` registers every name in ``ATSCALE_MODELS``; afterwards
``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)`` builds them and a folder written by
``timm.models.save_for_hf`` (``atscale.export.export_timm``) loads back with
``timm.create_model('local-dir:<folder>', pretrained=True)`` as long as this module was imported first.

Names (all are timm ``ResNet``s, built by ``AtscaleResNet``):

- Feature denoising (Xie thesis Chapter 4): ``resnet50_denoise``, ``resnet152_denoise`` (Gaussian non-local block after
  the last residual block of res2..res5, Sec 4.4-4.6.1), ``resnet152_denoise_all`` (Gaussian, a block after every
  residual block, 2x2 max-pool subsampling of the x_j, Sec 4.6.2), ``resnext101_32x8d_denoise`` (4 Gaussian blocks),
  ``resnext101_32x8d_denoise_all`` (the CAAD 2018 entry of Sec 4.6.2: a block after every residual block; the op is
  the dot-product non-local mean without embedding and without subsampling, as in the authors' released
  ``ResNeXtDenoiseAll`` model; ``denoise_op='gaussian', denoise_subsample=True`` gives the R-152 recipe instead).
- Smooth activations (Xie thesis Chapter 5): ``resnet50_{softplus,psoftplus,silu,gelu,elu,celu,smoothrelu}``
  (Sec 5.3.2, 5.4.1-5.4.3); ``resnet50_relu_softgrad`` (ReLU forward, parametric-Softplus backward for the
  attacker, the optimizer or both: the Table 5.1 ablation, Sec 5.3.2); the scaled SAT networks of Sec 5.5.1 Table 5.3 with SiLU: ``resnet101_silu``,
  ``resnet152_silu``, ``resnext50_32x4d_silu``, ``resnext50_32x8d_silu``, ``resnext152_32x8d_silu``; and the ReLU
  ``resnext50_32x8d``, ``resnext152_32x8d`` that timm lacks (standard adversarial training baselines of Sec 5.5.1).
- Deep ResNets (Xie thesis Sec 6.5): ``resnet338``, ``resnet638`` (``resnet200`` is timm's own). The thesis gives only
  the depths; the per-stage bottleneck counts are ``DEEP_RESNET_LAYERS`` (see there).

Keyword arguments accepted by every registered model, on top of timm ``ResNet``'s (``layers``, ``channels``,
``norm_layer`` ...):

- ``act`` (a name of ``atscale.layers.activations.ACTIVATIONS``) and ``act_kwargs`` (a dict, e.g.
  ``{"alpha": 10}``): the activation of the whole network, overriding the variant's (Sec 5.4). A string, so it is
  recorded in the exported ``config.json``; a class passed as timm's ``act_layer`` works too but ``save_for_hf``
  refuses to export it (not JSON).
- ``denoise_op`` (one of ``DENOISE_OPS``), ``denoise_placement`` (``stage_end`` or ``every_block``),
  ``denoise_embed``, ``denoise_subsample``, ``denoise_use_conv``, ``denoise_residual``: the denoising blocks of
  Sec 4.4-4.6 (``DenoiseBlock``), on any registered model (ablations). Overriding ``denoise_op`` of an ``_all`` model
  with an op that is not non-local drops its default subsampling unless ``denoise_subsample`` is given.
- ``grad_checkpointing=True``: ``model.set_grad_checkpointing(True)`` at creation (timm's, per residual block); a
  runtime option, left out of the recorded model arguments, so it never reaches an exported ``config.json``. Training
  runs should prefer ``perf.activation_checkpointing`` (``atscale.layers.checkpointing``): it also restores the pass
  state and the BN running statistics around the recomputation, and works for any timm ResNet / EfficientNet.
- ``denoise_fused=False``: the Gaussian non-local op as an explicit softmax over the (N, M) matrix instead of one
  fused attention kernel (a runtime option for the speed comparison; same weights, same function).

Export: timm's ``create_model`` records the creation kwargs in ``model._model_args`` and ``save_for_hf`` writes them as
``model_args``; the entrypoints here also record them when called directly, so the round trip rebuilds the same
architecture (denoise op, activation, channels, layers) and loads the weights with strict keys: the blocks are built
in the constructor, before timm loads any weights.

EfficientNets (Sec 5.5.2) are timm's own and already use SiLU; they take an activation of this project as
``timm.create_model('efficientnet_b0', act_layer=get_act_layer('smoothrelu'))`` (every SiLU, including the
squeeze-excitation's, becomes the new activation; the sigmoid gates stay). Such a class-valued ``act_layer`` cannot be
exported by ``save_for_hf``; timm's own string names (``act_layer='gelu'``) can.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from atscale.layers.activations import ACTIVATIONS, get_act_layer
from atscale.layers.denoise import DENOISE_OPS, NONLOCAL_OPS, PLACEMENTS, insert_denoise, make_denoise_op

__all__ = ["ATSCALE_MODELS", "ACT_MODELS", "DEEP_MODELS", "DEEP_RESNET_LAYERS", "DENOISE_MODELS", "AtscaleResNet",
           "base_model_args"]

R50, R101, R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)

DEEP_RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet338": (3, 24, 82, 3),
    "resnet638": (3, 24, 182, 3),
}
"""Bottlenecks per stage (res2..res5) of the deep ResNets of Xie thesis Sec 6.5.

The thesis (and its source paper, arXiv:1906.03787) names ResNet-338 and ResNet-638 by depth only. Depth = 3 x blocks +
2, so 338 and 638 need 112 and 212 bottlenecks. Assumption: ResNet-200's (3, 24, 36, 3) with the extra blocks all in
res4, the 14x14 stage that ResNet-101/152 deepen too. Override with ``layers=``.
"""

DENOISE_KWARGS: tuple[str, ...] = ("denoise_op", "denoise_placement", "denoise_embed", "denoise_subsample",
                                   "denoise_use_conv", "denoise_residual", "denoise_fused")
RUNTIME_KWARGS: tuple[str, ...] = ("grad_checkpointing", "denoise_fused")
_NOT_MODEL_ARGS = frozenset(RUNTIME_KWARGS + ("device", "dtype", "pretrained_model_args", "pretrained_cfg",
                                              "pretrained_cfg_overlay", "cache_dir"))

DENOISE_PAPER, SAT_PAPER, DEEP_PAPER = "arXiv:1812.03411", "arXiv:2006.14536", "arXiv:1906.03787"
CIFAR_PAPER = "arXiv:1512.03385"


class AtscaleResNet(ResNet):
    """timm ``ResNet`` whose constructor also adds feature-denoising blocks (Xie thesis Sec 4.4.1, 4.6).

    With ``denoise_op`` set, ``insert_denoise`` puts a ``DenoiseBlock`` after the last residual block of each stage
    (``denoise_placement="stage_end"``, Sec 4.6.1) or after every residual block (``"every_block"``, Sec 4.6.2),
    so a fresh model's ``state_dict()`` already holds their keys and timm's strict pretrained loading works. The
    blocks' BN is the model's ``norm_layer``. ``_model_args`` (timm's record of the creation kwargs, exported as
    ``model_args``) never keeps runtime options such as ``grad_checkpointing``.
    """

    def __init__(self, *args: Any, denoise_op: str | None = None, denoise_placement: str = "stage_end",
                 denoise_embed: bool | None = None, denoise_subsample: bool = False, denoise_use_conv: bool = True,
                 denoise_residual: bool = True, denoise_fused: bool = True, cifar_stem: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if cifar_stem:  # CIFAR ResNets (He et al. 2016 Sec 4.2; the JATP / ARN targets): 3x3 stride-1, no max-pool
            width = self.conv1.out_channels
            self.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.denoise_op = denoise_op
        if denoise_op is not None:
            block_kwargs: dict[str, Any] = {"embed": denoise_embed, "subsample": denoise_subsample,
                                            "use_conv": denoise_use_conv, "residual": denoise_residual,
                                            "fused": denoise_fused}
            if kwargs.get("norm_layer") is not None:
                block_kwargs["norm_layer"] = get_norm_layer(kwargs["norm_layer"])
            insert_denoise(self, op=denoise_op, placement=denoise_placement, **block_kwargs)

    @property
    def _model_args(self) -> dict[str, Any]:
        return self.__dict__.get("_atscale_model_args", {})

    @_model_args.setter
    def _model_args(self, value: dict[str, Any]) -> None:
        self.__dict__["_atscale_model_args"] = {k: v for k, v in value.items() if k not in RUNTIME_KWARGS}


def _check_denoise(args: dict[str, Any]) -> None:
    """Refuse bad denoise kwargs before a (possibly huge) trunk is built."""
    op = args.get("denoise_op")
    if op is None:
        extra = sorted(k for k in DENOISE_KWARGS if k in args and k != "denoise_op")
        if extra:
            raise ValueError(f"{extra} need denoise_op (one of {', '.join(DENOISE_OPS)})")
        return
    if op not in DENOISE_OPS:
        raise ValueError(f"denoise_op '{op}' is unknown; allowed: {', '.join(DENOISE_OPS)}")
    placement = args.get("denoise_placement", "stage_end")
    if placement not in PLACEMENTS:
        raise ValueError(f"denoise_placement '{placement}' is unknown; allowed: {', '.join(PLACEMENTS)}")
    make_denoise_op(op, 8, args.get("denoise_embed"), bool(args.get("denoise_subsample", False)))


def _resolve_act(args: dict[str, Any], user: dict[str, Any], grad_checkpointing: bool) -> None:
    """Turn ``act``/``act_kwargs`` into timm's ``act_layer`` (Xie thesis Sec 5.4); a user ``act_layer`` wins over the
    variant's default ``act``."""
    act, act_kwargs = args.pop("act", None), args.pop("act_kwargs", None)
    if "act_layer" in user:
        if "act" in user or "act_kwargs" in user:
            raise ValueError("give either act (a name, exportable) or act_layer (a timm act_layer), not both")
        return
    if act is None:
        if act_kwargs:
            raise ValueError(f"act_kwargs {act_kwargs} need act (one of {sorted(ACTIVATIONS)})")
        return
    if act_kwargs is not None and not isinstance(act_kwargs, dict):
        raise ValueError(f"act_kwargs must be a dict, got {type(act_kwargs).__name__}")
    args["act_layer"] = get_act_layer(act, **(act_kwargs or {}))
    if (grad_checkpointing and str(act).lower() == "relu_psoftplus_grad"
            and (act_kwargs or {}).get("grad_mode", "both") != "both"):
        raise ValueError("grad_checkpointing recomputes forward outside the attack/train pass, which "
                         "relu_psoftplus_grad with grad_mode != 'both' reads in forward; use one or the other")


def _create(variant: str, pretrained: bool, base: dict[str, Any], kwargs: dict[str, Any]) -> ResNet:
    """Build ``variant`` from its ``base`` arguments overridden by the caller's ``kwargs``."""
    args = {**base, **kwargs}
    if "denoise_op" in kwargs and "denoise_subsample" not in kwargs and kwargs["denoise_op"] not in NONLOCAL_OPS:
        args.pop("denoise_subsample", None)
    grad_checkpointing = bool(args.pop("grad_checkpointing", False))
    _resolve_act(args, kwargs, grad_checkpointing)
    _check_denoise(args)
    model = build_model_with_cfg(AtscaleResNet, variant, pretrained, **args)
    model._model_args = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS and v is not None}
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _cfg(paper: str, **kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1", "classifier": "fc", "paper_ids": paper, **kwargs}


def _resnet(layers: tuple[int, ...], **kwargs: Any) -> dict[str, Any]:
    return {"block": Bottleneck, "layers": layers, **kwargs}


def _resnext(layers: tuple[int, ...], width: int, **kwargs: Any) -> dict[str, Any]:
    return _resnet(layers, cardinality=32, base_width=width, **kwargs)


_GAUSS_4 = {"denoise_op": "gaussian", "denoise_placement": "stage_end"}
_SAT_380 = {"input_size": (3, 380, 380), "pool_size": (12, 12)}

_SPECS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "resnet50_denoise": (_resnet(R50, **_GAUSS_4), _cfg(DENOISE_PAPER),
                         "ResNet-50 with 4 Gaussian non-local denoising blocks after res2..res5 (Xie thesis Sec 4.4)."),
    "resnet152_denoise": (_resnet(R152, **_GAUSS_4), _cfg(DENOISE_PAPER),
                          "ResNet-152 with 4 Gaussian non-local denoising blocks after res2..res5 (Xie thesis Sec "
                          "4.5, 4.6.1)."),
    "resnet152_denoise_all": (_resnet(R152, denoise_op="gaussian", denoise_placement="every_block",
                                      denoise_subsample=True), _cfg(DENOISE_PAPER),
                              "ResNet-152 with a Gaussian non-local block after every residual block, keys 2x2 "
                              "max-pool subsampled (Xie thesis Sec 4.6.2)."),
    "resnext101_32x8d_denoise": (_resnext(R101, 8, **_GAUSS_4), _cfg(DENOISE_PAPER),
                                 "ResNeXt-101 32x8d with 4 Gaussian non-local denoising blocks (Xie thesis Sec 4.4)."),
    "resnext101_32x8d_denoise_all": (_resnext(R101, 8, denoise_op="dot", denoise_placement="every_block",
                                              denoise_embed=False), _cfg(DENOISE_PAPER),
                                     "ResNeXt-101 32x8d with a dot-product non-local block (no embedding, no "
                                     "subsampling) after every residual block: the CAAD 2018 entry (Xie thesis Sec "
                                     "4.6.2)."),
    "resnet50_softplus": (_resnet(R50, act="softplus"), _cfg(SAT_PAPER),
                          "ResNet-50 with Softplus (Xie thesis Sec 5.4.1)."),
    "resnet50_psoftplus": (_resnet(R50, act="psoftplus"), _cfg(SAT_PAPER),
                           "ResNet-50 with parametric Softplus, a = 10 (Xie thesis Sec 5.3.2, Eqn 5.2)."),
    "resnet50_silu": (_resnet(R50, act="silu"), _cfg(SAT_PAPER), "ResNet-50 with SiLU (Xie thesis Sec 5.4.1)."),
    "resnet50_gelu": (_resnet(R50, act="gelu"), _cfg(SAT_PAPER), "ResNet-50 with GELU (Xie thesis Sec 5.4.1)."),
    "resnet50_elu": (_resnet(R50, act="elu"), _cfg(SAT_PAPER), "ResNet-50 with ELU, alpha 1 (Xie thesis Sec 5.4.1)."),
    "resnet50_celu": (_resnet(R50, act="celu"), _cfg(SAT_PAPER), "ResNet-50 with CELU (Xie thesis Sec 5.4.3)."),
    "resnet50_smoothrelu": (_resnet(R50, act="smoothrelu"), _cfg(SAT_PAPER),
                            "ResNet-50 with SmoothReLU, learnable a per layer (Xie thesis Sec 5.4.2)."),
    "resnet50_relu_softgrad": (_resnet(R50, act="relu_psoftplus_grad"), _cfg(SAT_PAPER),
                               "ResNet-50 with ReLU forward and parametric-Softplus (a = 10) backward, the Table 5.1 "
                               "ablation (Xie thesis Sec 5.3.2); act_kwargs={'grad_mode': 'attack'|'train'|'both'}."),
    "resnet101_silu": (_resnet(R101, act="silu"), _cfg(SAT_PAPER),
                       "ResNet-101 with SiLU, 2x deeper SAT (Xie thesis Sec 5.5.1, Table 5.3)."),
    "resnet152_silu": (_resnet(R152, act="silu"), _cfg(SAT_PAPER),
                       "ResNet-152 with SiLU, 3x deeper SAT (Xie thesis Sec 5.5.1, Table 5.3)."),
    "resnext50_32x4d_silu": (_resnext(R50, 4, act="silu"), _cfg(SAT_PAPER),
                             "ResNeXt-50 32x4d with SiLU, 2x wider SAT (Xie thesis Sec 5.5.1, Table 5.3)."),
    "resnext50_32x8d_silu": (_resnext(R50, 8, act="silu"), _cfg(SAT_PAPER),
                             "ResNeXt-50 32x8d with SiLU, 4x wider SAT (Xie thesis Sec 5.5.1, Table 5.3)."),
    "resnext152_32x8d_silu": (_resnext(R152, 8, act="silu"), _cfg(SAT_PAPER, **_SAT_380),
                              "ResNeXt-152 32x8d with SiLU, the compound-scaled SAT network, trained at 380 (Xie "
                              "thesis Sec 5.5.1, Table 5.3)."),
    "resnext50_32x8d": (_resnext(R50, 8), _cfg(SAT_PAPER),
                        "ResNeXt-50 32x8d with ReLU, standard adversarial training baseline (Xie thesis Sec 5.5.1)."),
    "resnext152_32x8d": (_resnext(R152, 8), _cfg(SAT_PAPER, **_SAT_380),
                         "ResNeXt-152 32x8d with ReLU at 380, standard adversarial training baseline (Xie thesis Sec "
                         "5.5.1)."),
    "resnet18_cifar": ({"block": BasicBlock, "layers": (2, 2, 2, 2), "cifar_stem": True},
                       _cfg(CIFAR_PAPER, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
                       "ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool), the target network of "
                       "JATP and ARN (Zhou et al.) and f_a of Xiao & Zheng 2020."),
    "resnet338": (_resnet(DEEP_RESNET_LAYERS["resnet338"]), _cfg(DEEP_PAPER),
                  "ResNet-338, 112 bottlenecks (Xie thesis Sec 6.5; per-stage counts: DEEP_RESNET_LAYERS)."),
    "resnet638": (_resnet(DEEP_RESNET_LAYERS["resnet638"]), _cfg(DEEP_PAPER),
                  "ResNet-638, 212 bottlenecks (Xie thesis Sec 6.5; per-stage counts: DEEP_RESNET_LAYERS)."),
}

default_cfgs = generate_default_cfgs({name: cfg for name, (_, cfg, _) in _SPECS.items()})


def base_model_args(name: str) -> dict[str, Any]:
    """The architecture arguments registered ``name`` is built from before the caller's kwargs (a copy)."""
    return dict(_SPECS[name][0])


def named_entrypoint(fn: Callable[..., Any], name: str, module: str, doc: str) -> Callable[..., Any]:
    """``fn`` named as timm expects of a model entrypoint: ``name``, defined in ``module``, documented by ``doc``."""
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = module
    fn.__doc__ = doc
    return fn


def register_variant(fn: Callable[..., Any], namespace: dict[str, Any]) -> bool:
    """Register the entrypoint ``fn`` with timm under its name and bind it in ``namespace`` (the module's globals);
    when timm already has another model of that name, warn and keep timm's (returns False)."""
    name = fn.__name__
    if timm.is_model(name) and getattr(timm.models.model_entrypoint(name), "__module__", None) != fn.__module__:
        warnings.warn(f"timm already has a model '{name}'; atscale's variant is not registered", stacklevel=3)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-registering atscale's own entrypoint (a module reload)
        register_model(fn)
    namespace[name] = fn
    return True


def _entrypoint(name: str, base: dict[str, Any], doc: str) -> Callable[..., ResNet]:
    def fn(pretrained: bool = False, **kwargs: Any) -> ResNet:
        return _create(name, pretrained, base, kwargs)

    return named_entrypoint(fn, name, __name__, doc)


def _register_all() -> tuple[str, ...]:
    return tuple(name for name, (base, _, doc) in _SPECS.items()
                 if register_variant(_entrypoint(name, base, doc), globals()))


ATSCALE_MODELS: tuple[str, ...] = _register_all()
DENOISE_MODELS: tuple[str, ...] = tuple(n for n in ATSCALE_MODELS if "denoise_op" in _SPECS[n][0])
ACT_MODELS: tuple[str, ...] = tuple(n for n in ATSCALE_MODELS if "act" in _SPECS[n][0])
DEEP_MODELS: tuple[str, ...] = tuple(n for n in ATSCALE_MODELS if n in DEEP_RESNET_LAYERS)
