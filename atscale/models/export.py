"""Export a trained model to a folder that plain timm loads: ``model.safetensors`` + ``config.json``.

``timm.create_model('local-dir:<folder>', pretrained=True)`` rebuilds the architecture (with its recorded
``model_args``) and loads the weights; ``pretrained_cfg`` carries mean/std, input size and crop, so timm's own
preprocessing reproduces our built-in normalization and the logits match the trained model's. Beside the weights,
``atscale.json`` holds the run's config and ``robustbench_model_info.json`` RobustBench's model info when the caller
gives it (``atscale export`` and training's export fill it from the run: :mod:`atscale.evaluation.model_info`).

The folder is built beside the target as ``.<name>.<pid>@<host>.*`` and swapped in atomically
(:func:`atscale.fsio.replace_dir`), with the modes the user's umask implies; folders left by killed exports are
removed by the next one.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from timm.models import save_for_hf

from atscale.errors import ConfigError
from atscale.fsio import finalize_tree, make_temp_dir, replace_dir
from atscale.layers.mixture_bn import MixtureBatchNorm2d, collapse_mixture_bn, mixture_domains
from atscale.models.normalize import NormalizedModel

ROBUSTBENCH_INFO = "robustbench_model_info.json"
FOREIGN_STALE_S = 24 * 3600  # a temporary export folder of another host (or older atscale) this old is abandoned


def export_timm(model: NormalizedModel, out_dir: str | Path, *, mean, std, input_size: int, crop_pct: float = 0.875,
                interpolation: str = "bicubic", label_names: list[str] | None = None, extra: dict | None = None,
                bn_domain: str | None = None, robustbench: dict | None = None,
                files: dict[str, bytes] | None = None) -> Path:
    """Mixture BN models keep one domain as plain BN (``bn_domain``, else each layer's default; Xie thesis Sec 6.4.2,
    AdvProp drops the auxiliary BNs), so plain timm loads the folder. ``robustbench``: RobustBench's model info
    (:func:`atscale.evaluation.model_info.robustbench_model_info`), written as ``robustbench_model_info.json`` in the
    folder beside the weights. ``files``: more files of the folder by name (a defended model's pre-processor,
    :func:`atscale.defenses.export.preprocessor_files`), written inside the same atomic swap."""
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
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export folder '{out_dir}' is a file", "remove it or export to another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.{_owner_tag()}.")
    try:
        save_for_hf(net, tmp, model_config=model_config, data_config=data_config, safe_serialization=True)
        if extra:
            (tmp / "atscale.json").write_text(json.dumps(extra, indent=2))
        if robustbench is not None:
            (tmp / ROBUSTBENCH_INFO).write_text(json.dumps(robustbench, indent=2))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        finalize_tree(tmp)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    """``<pid>@<host>``: who builds a temporary export folder, so a later export can tell whether it is abandoned."""
    return f"{os.getpid()}@{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True
    return True


def remove_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Delete the temporary folders (``.<name>.<pid>@<host>.*``) that killed exports of ``out_dir`` left beside it.

    A folder is stale when it was made on this host by a process that no longer runs, or (another host, whose
    processes cannot be checked, or an unnamed folder of an older atscale) when untouched for
    :data:`FOREIGN_STALE_S` seconds. Returns the folders deleted."""
    out_dir = Path(out_dir)
    ours = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)@([A-Za-z0-9-]+)\..+")
    legacy = re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}")
    host, removed = _host(), []
    for p in out_dir.parent.iterdir():
        m = ours.fullmatch(p.name)
        if not p.is_dir() or p.is_symlink() or not (m or legacy.fullmatch(p.name)):
            continue
        try:
            stale = not _pid_alive(int(m[1])) if m and m[2] == host else \
                time.time() - p.stat().st_mtime > FOREIGN_STALE_S
        except FileNotFoundError:
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
