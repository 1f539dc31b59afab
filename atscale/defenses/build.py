"""Build the model of a run: the classifier of ``model.*``, and the defended model when ``defense.preprocessor`` is
set (:class:`~atscale.defenses.model.DefendedModel`). Training, checkpoints, evaluation and planning all build through
:func:`build_model`, so a defended run is rebuilt the same way everywhere."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from atscale.config.schema import DefenseCfg, ModelCfg
from atscale.config.units import to_fraction
from atscale.defenses.model import DefendedModel
from atscale.defenses.transform import AdversarialTransform
from atscale.models import NormalizedModel, build_from_config, create_model
from atscale.models.preprocessors import create_preprocessor

__all__ = ["build_model", "build_preprocessor", "preprocessor_spec"]


def preprocessor_spec(defense: DefenseCfg, model_cfg: ModelCfg, num_classes: int) -> dict[str, Any]:
    """Everything :func:`build_preprocessor` needs, as JSON (budgets as fractions of the pixel range)."""
    spec: dict[str, Any] = {"name": defense.preprocessor, "kwargs": dict(defense.kwargs), "train": defense.train}
    if defense.preprocessor == "adv_transform":
        spec.update(base_arch=defense.base_arch, base_kwargs=dict(defense.base_kwargs),
                    num_classes=model_cfg.num_classes or num_classes, mean=list(model_cfg.mean),
                    std=list(model_cfg.std), delta=to_fraction(defense.delta), iters=defense.iters,
                    step=to_fraction(defense.step or defense.delta / 6), seed=defense.seed)
    return spec


def build_preprocessor(spec: dict[str, Any]) -> nn.Module:
    """The pre-processor of ``spec`` with fresh weights (f_b of the adversarial transformation included)."""
    if spec["name"] == "adv_transform":
        base = create_model(spec["base_arch"], spec["num_classes"], spec["mean"], spec["std"], spec["base_kwargs"],
                            channels_last=False)
        return AdversarialTransform(base, spec["delta"], spec["iters"], spec["step"], spec["seed"])
    return create_preprocessor(spec["name"], spec["kwargs"])


def build_model(model_cfg: ModelCfg, defense: DefenseCfg, num_classes: int) -> NormalizedModel:
    """The classifier, or P in front of it when ``defense.preprocessor`` is set."""
    classifier = build_from_config(model_cfg, num_classes)
    if not defense.preprocessor:
        return classifier
    spec = preprocessor_spec(defense, model_cfg, num_classes)
    model = DefendedModel(build_preprocessor(spec), classifier.net, model_cfg.mean, model_cfg.std, defense.train, spec)
    return model.to(memory_format=torch.channels_last) if model_cfg.channels_last else model
