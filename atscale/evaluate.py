"""Evaluate or export a trained checkpoint: rebuild the model from the config stored inside it.

``atscale eval CKPT --attacks pgd10,pgd100`` runs PGD-k (flat eval.json in the run folder); ``--suite`` runs a named
robustness suite (atscale.suite) with gradient-masking flags, ``--shift-root`` distribution-shift test sets
(atscale.shift). Under torchrun every rank evaluates its strided shard of the data and counts are summed.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from atscale import distributed as dist
from atscale import sanity
from atscale.checkpoint import load_checkpoint
from atscale.config import Config, ConfigError, config_from_yaml_text
from atscale.data import make_loader, read_meta
from atscale.engine import evaluate
from atscale.export import export_timm
from atscale.layers.mixture_bn import set_default_domain
from atscale.models import NormalizedModel, build_from_config
from atscale.perf import set_backend_flags
from atscale.report import results_table, suite_table
from atscale.train import _load_model_state, eval_attacks, resolve_amp, write_eval

_ATTACK_RE = re.compile(r"^pgd(\d+)$")


def model_from_checkpoint(path: str | Path, device: torch.device, bn_domain: str | None = None,
                          weights: str = "auto") -> tuple[NormalizedModel, Config, dict]:
    """The trained model in eval mode; Mixture BN models evaluate ``bn_domain`` (default: the run's eval domain).

    ``weights``: "auto" = the EMA weights when the run kept them (``optim.ema_decay``; what its evaluation and export
    used), else the raw ones; "raw" or "ema" to choose."""
    state = load_checkpoint(path, map_location=device)
    cfg = config_from_yaml_text(state["config"])
    meta = json.loads(state["meta"])
    model = build_from_config(cfg.model, meta["num_classes"]).to(device)
    if weights == "ema" and "model_ema" not in state:
        raise ConfigError(f"checkpoint '{path}' holds no EMA weights (the run had optim.ema_decay = 0)")
    use_ema = weights == "ema" or (weights == "auto" and "model_ema" in state)
    _load_model_state(model, state["model_ema" if use_ema else "model"], str(path), cfg)
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


def _dataset_name(meta: dict) -> str:
    src = meta.get("source", "")
    if src == "imagefolder":
        return "imagenet" if meta.get("num_classes") == 1000 else "imagefolder"
    return src


def eval_checkpoint(path: str | Path, *, attacks: str | None = None, eps: float | None = None,
                    step: float | None = None, targeted: bool | None = None, max_images: int | None = None,
                    data_root: str | None = None, out: str | Path | None = None, device: str = "auto",
                    progress: bool = True, bn_domain: str | None = None, suite: str | None = None,
                    shift: list[tuple[str, str]] | None = None, **suite_kw) -> dict:
    """``--attacks pgd10,...`` (flat eval.json in the run folder) or, with ``suite`` / ``shift``, :func:`eval_suite`."""
    if suite or shift:
        if attacks:
            raise ConfigError("give either --attacks (PGD-k list) or --suite, not both")
        return eval_suite(path, suite=suite, eps=eps, step=step, targeted=targeted, max_images=max_images,
                          data_root=data_root, out=out, device=device, progress=progress, bn_domain=bn_domain,
                          shift=shift, **suite_kw)
    env = dist.DistEnv.from_env()
    dev = dist.init(env, device)
    try:
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
        set_backend_flags(cfg.perf, dev)
        loader = make_loader(data.root, "val", data, dev, cfg.run.seed, train=False,
                             channels_last=cfg.model.channels_last, rank=dist.rank(), world_size=dist.world_size())
        results = evaluate(model, loader, eval_attacks(ev, amp, cfg.run.seed), amp_dtype=amp,
                           max_images=ev.max_images, progress=progress and dist.rank() == 0)
        if dist.rank() == 0:
            out_dir = Path(out) if out else Path(path).resolve().parent.parent
            write_eval(out_dir, results,
                       f"{cfg.model.arch}, eps {ev.eps:g}/255, {'targeted' if ev.targeted else 'untargeted'}")
            print(results_table(results))
        return results
    finally:
        if env.distributed:
            dist.cleanup()


def eval_suite(path: str | Path, *, suite: str | None = "quick", eps: float | None = None, step: float | None = None,
               targeted: bool | None = None, max_images: int | None = None, data_root: str | None = None,
               out: str | Path | None = None, device: str = "auto", progress: bool = True,
               bn_domain: str | None = None, shift: list[tuple[str, str]] | None = None,
               mce_baseline: str | None = None, shift_cache: str | None = None, shift_max_images: int = 0,
               shift_crop_ratio: float | None = None, shift_write_mode: str = "jpg", seed: int | None = None,
               sanity_opts: sanity.SanityOptions | None = None) -> dict:
    """Run a robustness suite (:mod:`atscale.suite`) and/or distribution-shift sets (:mod:`atscale.shift`) on a
    checkpoint; rank 0 writes eval.json, eval.md, plots and (Linf 4/255 AutoAttack) robustbench_model_info.json to
    ``out`` (default ``<run>/eval/<suite>``). Under torchrun every rank evaluates its strided shard."""
    env = dist.DistEnv.from_env()
    dev = dist.init(env, device)
    try:
        return _eval_suite(path, dev, suite=suite, eps=eps, step=step, targeted=targeted, max_images=max_images,
                           data_root=data_root, out=out, progress=progress and dist.rank() == 0, bn_domain=bn_domain,
                           shift=shift or [], mce_baseline=mce_baseline, shift_cache=shift_cache,
                           shift_max_images=shift_max_images, shift_crop_ratio=shift_crop_ratio,
                           shift_write_mode=shift_write_mode, seed=seed, sanity_opts=sanity_opts)
    finally:
        if env.distributed:
            dist.cleanup()


def _eval_suite(path, dev, *, suite, eps, step, targeted, max_images, data_root, out, progress, bn_domain, shift,
                mce_baseline, shift_cache, shift_max_images, shift_crop_ratio, shift_write_mode, seed,
                sanity_opts) -> dict:
    from atscale.shift import LAYOUTS, evaluate_shift, load_baseline
    from atscale.suite import get_suite, robustbench_info, run_suite, write_outputs

    for root, layout in shift:
        if layout not in LAYOUTS:
            raise ConfigError(f"--shift-layout {layout!r} for {root}: one of {', '.join(LAYOUTS)}")
    if mce_baseline is not None:
        load_baseline(mce_baseline)  # fail before any evaluation runs
    model, cfg, meta = model_from_checkpoint(path, dev, bn_domain)
    st = get_suite(suite, eps=eps, step=step, targeted=targeted,
                   defaults=(cfg.eval.eps, cfg.eval.step, cfg.eval.targeted)) if suite else None
    seed = cfg.run.seed if seed is None else seed
    amp = resolve_amp(cfg.run.amp, dev)
    set_backend_flags(cfg.perf, dev)
    out_dir = Path(out) if out else Path(path).resolve().parent.parent / "eval" / (st.name if st else "shift")
    data = replace(cfg.data, root=data_root or cfg.data.root)
    domain = bn_domain or (cfg.model.eval_domain or (cfg.model.bn_domains[0] if cfg.model.bn_domains else None))
    doc: dict = {"checkpoint_info": {"checkpoint": str(path), "arch": cfg.model.arch, "bn_domain": domain,
                                     "data": str(data.root), "dataset": _dataset_name(meta),
                                     "num_classes": meta.get("num_classes")}}
    title = f"{cfg.model.arch}" + (f" [{domain}]" if domain else "") + (f", suite {st.name}" if st else "")
    if st is not None:
        read_meta(data.root)
        surrogates = {}
        for spec in st.attacks:
            if spec.source and spec.source not in surrogates:
                surrogates[spec.source] = model_from_checkpoint(spec.source, dev)[0]
        loader = make_loader(data.root, "val", data, dev, seed, train=False, channels_last=cfg.model.channels_last,
                             rank=dist.rank(), world_size=dist.world_size())
        n_max = cfg.eval.max_images if max_images is None else max_images
        doc.update(run_suite(model, loader, st, amp_dtype=amp, max_images=n_max, seed=seed, progress=progress,
                             surrogates=surrogates, sanity_opts=sanity_opts))
        if dist.rank() == 0:
            sanity.warn([sanity.Flag(**f) for f in doc["flags"]], str(path))
    if shift:
        clean_err = 1 - doc["results"]["clean"]["acc"] if "results" in doc else None
        doc["shift"] = [evaluate_shift(model, root, layout, classes=meta.get("classes") or [], data_cfg=cfg.data,
                                       device=dev, cache_dir=shift_cache or out_dir / "shift_cache",
                                       baseline=mce_baseline, clean_error=clean_err, amp_dtype=amp,
                                       max_images=shift_max_images, crop_ratio=shift_crop_ratio,
                                       write_mode=shift_write_mode, channels_last=cfg.model.channels_last, seed=seed,
                                       progress=progress)
                        for root, layout in shift]
    if dist.rank() != 0:
        return doc
    rb = None
    if st is not None:
        rb = robustbench_info(doc, name=Path(path).resolve().parent.parent.name, arch=cfg.model.arch,
                              dataset=_dataset_name(meta), extra={"bn_domain": domain, "checkpoint": str(path)})
    if st is not None and st.robustbench and rb is None:
        warnings.warn(f"suite {st.name!r} asks for RobustBench model info but has no untargeted Linf AutoAttack row "
                      f"at eps 4/255 ('standard', or an aggregate of apgd-ce, apgd-t, fab-t and square)", stacklevel=2)
    paths = write_outputs(doc, out_dir, title=title, robustbench=rb)
    doc["paths"] = {k: str(v) for k, v in paths.items()}
    if st is not None:
        print(suite_table(doc["results"]))
    for s in doc.get("shift", []):
        extra = f", mCE {100 * s['mce']:.2f}%" if s.get("mce") is not None else ""
        print(f"{s['layout']} {s['root']}: accuracy {100 * s['acc']:.2f}% on {s['n']} images{extra}")
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return doc


def export_checkpoint(path: str | Path, out: str | Path, bn_domain: str | None = None) -> Path:
    model, cfg, meta = model_from_checkpoint(path, torch.device("cpu"), bn_domain)
    return export_timm(model, out, mean=cfg.model.mean, std=cfg.model.std, input_size=cfg.data.val_size,
                       crop_pct=cfg.data.val_crop_ratio, label_names=meta.get("classes"),
                       extra={"checkpoint": str(path), "config": cfg.to_dict()})


if __name__ == "__main__":  # torchrun --nproc-per-node N -m atscale.evaluate CKPT --suite quick
    import sys

    from atscale.cli import main as _cli_main

    sys.exit(_cli_main(["eval", *sys.argv[1:]]))
