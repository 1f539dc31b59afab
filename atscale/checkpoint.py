"""Checkpoint files: atomic writes, the ``<run>/checkpoints`` folder with retention, safe loads, and the model read
back from a checkpoint (what ``atscale eval`` and ``export`` use).

The state inside a file is :meth:`atscale.training.run.Run.state_dict`'s (the one writer of the format); this module
reads the keys every checkpoint holds: ``model`` (and ``model_ema`` when the run kept an average), ``config`` (YAML
text) and ``meta`` (the dataset's meta.json as text). Files are written to a temporary file in the same folder, fsynced
and renamed, so a kill mid-save leaves the previous checkpoint intact; they hold only state_dicts, tensors, numbers and
text, so they load with ``torch.load(weights_only=True)``. Layer: above config, models, defenses and distributed; below
training and evaluation.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atscale.config import Config, DefenseCfg, config_from_yaml_text
from atscale.errors import STORAGE_ERRNOS, CheckpointError, ConfigError
from atscale.fsio import atomic_write_bytes
from atscale.defenses import build_model
from atscale.defenses.export import is_defended_export, load_preprocessor
from atscale.layers.mixture_bn import set_default_domain
from atscale.models import NormalizedModel


WRITE_ERRNOS = STORAGE_ERRNOS + (errno.EACCES, errno.EPERM)


def check_room(folder: Path, nbytes: int, why: str = "") -> None:
    """Refuse (before writing) when ``folder``'s filesystem has less than ``nbytes`` (+1 MiB) free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < nbytes + (1 << 20):
        raise CheckpointError(
            f"not enough disk space in '{folder}': the next checkpoint needs {nbytes / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free{why}",
            "free space there, lower run.keep_last, or move run.out_dir to a larger filesystem; the previous "
            "checkpoint is intact, continue with --resume auto")


def save_checkpoint(state: dict[str, Any], path: Path, why: str = "") -> None:
    """Serialize ``state`` and write it atomically to ``path``: the space is checked first, and a failed write
    (disk full, quota, read-only folder) leaves the previous file intact and raises a :class:`CheckpointError`."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    check_room(path.parent, len(data), why)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise CheckpointError(f"writing checkpoint '{path}' failed: {e.strerror} (errno {e.errno})",
                              "free space or fix the folder's permissions; the previous checkpoint is intact, "
                              "continue with --resume auto") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .pt file written by `atscale train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read safely ({type(e).__name__}): it is truncated, corrupt, or holds "
            "objects other than tensors and plain values, so it is not an atscale checkpoint",
            "pass a .pt file written by `atscale train`, or resume from an earlier step_*.pt; never load an "
            "untrusted file with weights_only=False") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not an atscale checkpoint (no 'model' and 'config' entries)")
    return state


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


class CheckpointDir:
    """``<run>/checkpoints``: ``step_<n>.pt`` files with retention, plus ``last.pt`` pointing at the newest."""

    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``step_<n>.pt`` atomically, point ``last.pt`` at it, and drop old steps (with their ``.ds`` folder of
        DeepSpeed partitions, when there is one). The new file is written before old ones are pruned, so the folder
        needs room for ``keep_last + 1`` checkpoints; the space is checked before writing."""
        path = self.root / f"{self.step_name(step)}.pt"
        save_checkpoint(state, path, why=f" (run.keep_last = {self.keep_last}: the folder holds up to "
                                         f"{self.keep_last + 1} checkpoints while the newest is written)")
        tmp = self.root / f".last.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # last.pt shares the step file's bytes; the rename keeps it atomic
            os.replace(tmp, self.last)
        except OSError:
            tmp.unlink(missing_ok=True)
            save_checkpoint(state, self.last)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(".ds"), ignore_errors=True)
        return path

    def step_files(self) -> list[Path]:
        files = [p for p in self.root.glob("step_*.pt") if _STEP_RE.search(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.search(p.name).group(1)))

    def newest_first(self) -> list[Path]:
        """Every training checkpoint of the folder, newest first: ``last.pt`` when it is (a link to) the newest
        step file or there is none, then the ``step_*.pt`` files by decreasing step. A step file newer than
        ``last.pt`` (a kill between writing it and re-pointing ``last.pt``, or a deleted ``last.pt``) comes first."""
        steps = self.step_files()[::-1]
        if not self.last.is_file():
            return steps
        if not steps or _same_file(self.last, steps[0]):
            return [self.last] + steps[1:]
        return steps + [self.last]

    def resolve(self, resume: str) -> list[Path]:
        """The checkpoints to try for ``run.resume``, in order: ``auto`` -> :meth:`newest_first` (empty when there is
        none); a path -> that path; '' -> nothing."""
        if not resume:
            return []
        if resume == "auto":
            return self.newest_first()
        p = Path(resume)
        if not p.is_file():
            raise CheckpointError(f"run.resume = '{resume}' is not a file; use 'auto' or a path to a checkpoint")
        return [p]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_model_state(model: nn.Module, state: dict, where: str, cfg: Config) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error naming the mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:2])[:300] or lines[0][:300]
        raise CheckpointError(f"checkpoint '{where}' does not fit model '{cfg.model.arch}' {cfg.model.kwargs} "
                              f"({detail})", "use the same model.* settings as the run that wrote it") from None


def model_from_state(state: dict, where: str | Path, device: torch.device, bn_domain: str = "",
                     weights: str = "auto") -> tuple[NormalizedModel, Config, dict]:
    """The trained model of a loaded checkpoint in eval mode, its run's config and the dataset meta. Mixture BN models
    evaluate ``bn_domain`` (default: the run's ``model.eval_domain``). ``weights``: "auto" = the EMA weights when the
    run kept them (``optim.ema_decay``; what its evaluation and export used), else the raw ones; "raw" or "ema"."""
    cfg = config_from_yaml_text(state["config"])
    meta = json.loads(state["meta"])
    model = build_model(cfg.model, cfg.defense, meta["num_classes"]).to(device)
    if weights == "ema" and "model_ema" not in state:
        raise ConfigError(f"checkpoint '{where}' holds no EMA weights (the run had optim.ema_decay = 0)",
                          "use eval.weights=auto or raw")
    use_ema = weights == "ema" or (weights == "auto" and "model_ema" in state)
    load_model_state(model, state["model_ema" if use_ema else "model"], str(where), cfg)
    if bn_domain:
        if bn_domain not in cfg.model.bn_domains:
            raise ConfigError(f"BN domain {bn_domain!r} is not one of this model's BN domains "
                              f"{cfg.model.bn_domains or '(none)'}", "name one of them, or none for a plain-BN model")
        set_default_domain(model, bn_domain)
    return model.eval(), cfg, meta


def model_from_checkpoint(path: str | Path, device: torch.device, bn_domain: str = "",
                          weights: str = "auto") -> tuple[NormalizedModel, Config, dict]:
    """:func:`model_from_state` of the checkpoint file ``path``."""
    return model_from_state(load_checkpoint(path, map_location=device), path, device, bn_domain, weights)


def _pretrained_state(source: str) -> dict[str, torch.Tensor]:
    """The timm net's state dict named by ``model.init_from``."""
    path = Path(source.removeprefix("local-dir:"))
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"model.init_from = '{source}' is not a file or a folder with model.safetensors",
                              "give an atscale .pt checkpoint, an export folder (local-dir:DIR) or a .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint(path) if path.suffix == ".pt" else torch.load(path, map_location="cpu",
                                                                             weights_only=True)
    if "config" in state and "model" in state:  # an atscale checkpoint: the evaluated weights of its net
        weights = state.get("model_ema", state["model"])
        return {k.removeprefix("net."): v for k, v in weights.items() if k.startswith("net.")}
    return state.get("state_dict", state.get("model", state))


def init_from_pretrained(model: NormalizedModel, source: str) -> list[str]:
    """Load ``source``'s weights into ``model.net`` (fine-tuning); a classifier whose shape differs (another class
    count) keeps its fresh initialization. Returns the names re-initialized; any other mismatch is a CheckpointError."""
    net, state = model.net, _pretrained_state(source)
    own = net.state_dict()
    head = {f"{net.default_cfg.get('classifier', 'head')}.{k}" for k in net.get_classifier().state_dict()} \
        if hasattr(net, "get_classifier") else set()
    reset = sorted(k for k in head if k in state and k in own and state[k].shape != own[k].shape)
    state = {k: v for k, v in state.items() if k not in reset}
    missing, unexpected = (sorted(set(own) - set(state) - set(reset)), sorted(set(state) - set(own)))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"model.init_from = '{source}' does not fit model '{type(net).__name__}': missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {bad[:3]}",
            "use weights of the same architecture and model.kwargs (only the classifier may differ)")
    net.load_state_dict(state, strict=False)
    return reset


def init_defense_from(model: nn.Module, defense: DefenseCfg) -> None:
    """Initial weights of a defended model's pre-processor (``defense.init_from``: a defended export folder or an
    atscale checkpoint of a defended run) and of the adversarial transformation's f_b (``defense.base_from``: any
    ``model.init_from`` source of f_b's architecture and class count)."""
    if defense.init_from:
        source = defense.init_from.removeprefix("local-dir:")
        if is_defended_export(source):
            pre, spec = load_preprocessor(source)
            state = pre.state_dict()
        elif Path(source).is_file() and source.endswith(".pt"):
            ckpt = load_checkpoint(source)
            weights = ckpt.get("model_ema", ckpt["model"])
            state = {k.removeprefix("preprocessor."): v for k, v in weights.items() if k.startswith("preprocessor.")}
            spec = {"name": config_from_yaml_text(ckpt["config"]).defense.preprocessor}
        else:
            raise CheckpointError(f"defense.init_from = '{defense.init_from}' is neither an export folder of a defended "
                                  "model nor an atscale .pt checkpoint", "give one of those")
        if spec.get("name") != model.spec["name"] or not state:
            raise CheckpointError(f"defense.init_from = '{defense.init_from}' holds a '{spec.get('name') or 'no'}' "
                                  f"pre-processor, this run builds '{model.spec['name']}'",
                                  "use weights of the same defense.preprocessor and defense.kwargs")
        try:
            model.preprocessor.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"defense.init_from = '{defense.init_from}' does not fit defense.kwargs "
                                  f"{defense.kwargs} ({str(e).splitlines()[1].strip()[:200]})",
                                  "use the same defense.kwargs as the run that wrote it") from None
    if defense.base_from:
        reset = init_from_pretrained(model.preprocessor.base, defense.base_from)
        if reset:
            raise CheckpointError(f"defense.base_from = '{defense.base_from}' classifies another number of classes "
                                  "than this dataset", "train f_b on the same classes (Xiao & Zheng 2020, Sec 3.2)")

