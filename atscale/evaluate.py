"""Evaluate or export a trained checkpoint: rebuild the model from the config stored inside it."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from atscale.checkpoint import load_checkpoint
from atscale.config import Config, ConfigError, config_from_yaml_text
from atscale.data import make_loader, read_meta
from atscale.distributed import resolve_device
from atscale.engine import evaluate
from atscale.export import export_timm
from atscale.layers.mixture_bn import set_default_domain
from atscale.models import NormalizedModel, build_from_config
from atscale.report import results_table
from atscale.train import _load_model_state, eval_attacks, resolve_amp, write_eval

_ATTACK_RE = re.compile(r"^pgd(\d+)$")


def model_from_checkpoint(path: str | Path, device: torch.device,
                          bn_domain: str | None = None) -> tuple[NormalizedModel, Config, dict]:
    """The trained model in eval mode; Mixture BN models evaluate ``bn_domain`` (default: the run's eval domain)."""
    state = load_checkpoint(path, map_location=device)
    cfg = config_from_yaml_text(state["config"])
    meta = json.loads(state["meta"])
    model = build_from_config(cfg.model, meta["num_classes"]).to(device)
    _load_model_state(model, state["model"], str(path), cfg)
    if bn_domain:
        if bn_domain not in cfg.model.bn_domains:
            raise ConfigError(f"--bn-domain {bn_domain!r}: this model's BN domains are {cfg.model.bn_domains or 'none'}")
        set_default_domain(model, bn_domain)
    return model.eval(), cfg, meta


def parse_attacks(text: str) -> list[int]:
    steps = []
    for name in filter(None, (t.strip() for t in text.split(","))):
        m = _ATTACK_RE.match(name)
        if not m or int(m.group(1)) < 1:
            raise ConfigError(f"unknown attack '{name}'; supported here: pgd<k> with k >= 1, e.g. pgd10,pgd100")
        steps.append(int(m.group(1)))
    if not steps:
        raise ConfigError("--attacks is empty; give e.g. pgd10,pgd100")
    return steps


def eval_checkpoint(path: str | Path, *, attacks: str | None = None, eps: float | None = None,
                    step: float | None = None, targeted: bool | None = None, max_images: int | None = None,
                    data_root: str | None = None, out: str | Path | None = None, device: str = "auto",
                    progress: bool = True, bn_domain: str | None = None) -> dict:
    dev = resolve_device(device)
    model, cfg, _ = model_from_checkpoint(path, dev, bn_domain)
    ev = cfg.eval
    ev = replace(ev, steps=parse_attacks(attacks) if attacks else ev.steps, eps=ev.eps if eps is None else eps,
                 step=ev.step if step is None else step, targeted=ev.targeted if targeted is None else targeted,
                 max_images=ev.max_images if max_images is None else max_images)
    if not 0 <= ev.eps <= 255:
        raise ConfigError(f"--eps {ev.eps} is out of range: budgets are in 0..255 pixel units (16 means 16/255)")
    data = replace(cfg.data, root=data_root or cfg.data.root)
    read_meta(data.root)
    amp = resolve_amp(cfg.run.amp, dev)
    loader = make_loader(data.root, "val", data, dev, cfg.run.seed, train=False, channels_last=cfg.model.channels_last)
    results = evaluate(model, loader, eval_attacks(ev, amp, cfg.run.seed), amp_dtype=amp, max_images=ev.max_images,
                       progress=progress)
    out_dir = Path(out) if out else Path(path).resolve().parent.parent
    write_eval(out_dir, results, f"{cfg.model.arch}, eps {ev.eps:g}/255, {'targeted' if ev.targeted else 'untargeted'}")
    print(results_table(results))
    return results


def export_checkpoint(path: str | Path, out: str | Path, bn_domain: str | None = None) -> Path:
    model, cfg, meta = model_from_checkpoint(path, torch.device("cpu"), bn_domain)
    return export_timm(model, out, mean=cfg.model.mean, std=cfg.model.std, input_size=cfg.data.val_size,
                       crop_pct=cfg.data.val_crop_ratio, label_names=meta.get("classes"),
                       extra={"checkpoint": str(path), "config": cfg.to_dict()})
