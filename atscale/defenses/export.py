"""A defended model's export folder and its one-call reload.

The folder is the classifier's timm export (``model.safetensors`` + ``config.json``: plain
``timm.create_model('local-dir:<folder>', pretrained=True)`` still loads the classifier alone) plus
``preprocessor.safetensors`` (P's weights; f_b's too for the adversarial transformation) and ``preprocessor.json``
(how to rebuild P: :func:`atscale.defenses.build.preprocessor_spec`). :func:`load_defended` rebuilds the whole
defended model from it.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save
from torch import nn

from atscale.defenses.build import build_preprocessor
from atscale.defenses.model import DefendedModel
from atscale.errors import CheckpointError

__all__ = ["PREPROCESSOR_WEIGHTS", "PREPROCESSOR_SPEC", "preprocessor_files", "load_defended", "is_defended_export"]

PREPROCESSOR_WEIGHTS = "preprocessor.safetensors"
PREPROCESSOR_SPEC = "preprocessor.json"


def preprocessor_files(model: nn.Module) -> dict[str, bytes]:
    """The pre-processor's files for :func:`atscale.models.export.export_timm` (``files=``); {} for a classifier."""
    if not isinstance(model, DefendedModel):
        return {}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.preprocessor.state_dict().items()}
    return {PREPROCESSOR_WEIGHTS: save(state), PREPROCESSOR_SPEC: json.dumps(model.spec, indent=2).encode()}


def is_defended_export(folder: str | Path) -> bool:
    return (Path(folder) / PREPROCESSOR_SPEC).is_file()


def load_preprocessor(folder: str | Path) -> tuple[nn.Module, dict]:
    """P and its spec from an export folder of a defended model."""
    folder = Path(folder)
    if not is_defended_export(folder):
        raise CheckpointError(f"'{folder}' has no {PREPROCESSOR_SPEC}: it is not the export of a defended model",
                              "export a run with defense.preprocessor set, or load the classifier with timm")
    spec = json.loads((folder / PREPROCESSOR_SPEC).read_text())
    pre = build_preprocessor(spec)
    try:
        pre.load_state_dict(load_file(str(folder / PREPROCESSOR_WEIGHTS)), strict=True)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"the pre-processor weights in '{folder}' do not fit its {PREPROCESSOR_SPEC} "
                              f"({str(e).splitlines()[0][:200]})", "export the run again") from None
    return pre, spec


def load_defended(folder: str | Path, device: str | torch.device = "cpu") -> DefendedModel:
    """The defended model of an export folder, in eval mode: P from ``preprocessor.*``, the classifier through timm."""
    import atscale.models  # noqa: F401  (atscale's timm variants must be registered before timm loads the folder)

    pre, spec = load_preprocessor(folder)
    net = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True)
    cfg = net.pretrained_cfg
    model = DefendedModel(pre, net, cfg["mean"], cfg["std"], spec.get("train", "both"), spec)
    return model.to(device).eval()
