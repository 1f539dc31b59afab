"""Export a trained model to a folder that plain timm loads: ``model.safetensors`` + ``config.json``.

``timm.create_model('local-dir:<folder>', pretrained=True)`` rebuilds the architecture (with its recorded
``model_args``) and loads the weights; ``pretrained_cfg`` carries mean/std, input size and crop, so timm's own
preprocessing reproduces our built-in normalization and the logits match the trained model's.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from timm.models import save_for_hf

from atscale.layers.mixture_bn import MixtureBatchNorm2d, collapse_mixture_bn, mixture_domains
from atscale.models.normalize import NormalizedModel


def export_timm(model: NormalizedModel, out_dir: str | Path, *, mean, std, input_size: int, crop_pct: float = 0.875,
                interpolation: str = "bicubic", label_names: list[str] | None = None, extra: dict | None = None,
                bn_domain: str | None = None) -> Path:
    """Mixture BN models keep one domain as plain BN (``bn_domain``, else each layer's default; Xie thesis Sec 6.4.2,
    AdvProp drops the auxiliary BNs), so plain timm loads the folder."""
    out_dir = Path(out_dir)
    net = copy.deepcopy(model.net).to("cpu", memory_format=torch.contiguous_format).eval()
    domains = mixture_domains(net)
    if domains:
        collapse_mixture_bn(net, bn_domain or next(m.default for m in net.modules() if isinstance(m, MixtureBatchNorm2d)))
    data_config = {"input_size": (3, input_size, input_size), "mean": tuple(mean), "std": tuple(std),
                   "crop_pct": crop_pct, "interpolation": interpolation}
    # the architecture's default pretrained_cfg describes timm's ImageNet weights, not these: replace its provenance
    model_config: dict = {"pretrained_cfg": {"tag": "atscale", "origin_url": None, "paper_ids": None,
                                             "license": None}}
    if label_names:
        model_config["label_names"] = list(label_names)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_for_hf(net, tmp, model_config=model_config, data_config=data_config, safe_serialization=True)
        if extra:
            (tmp / "atscale.json").write_text(json.dumps(extra, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
