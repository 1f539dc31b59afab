"""Evaluate or export a trained checkpoint: ``atscale eval CKPT [--suite NAME] [key=value ...]``.

The checkpoint's own config is the evaluation config; ``eval.*``, ``data.*``, ``run.*``, ``log.*`` and ``perf.*``
overrides (the CLI's flags are aliases of them) change it, validated like a training config. The suite (``eval.suite``;
"" or ``run`` = the run's own PGD-k list) runs through the one evaluator (:mod:`atscale.evaluation.evaluator`), with
distribution-shift sets (:mod:`atscale.evaluation.shift`) when ``eval.shift.roots`` are given. The images come from
the run's val ``.beton`` (``eval.preprocess: ffcv``) or, for RobustBench's pre-processings, from the val JPEGs of
``eval.jpeg_root`` (default ``<data.src>/val``), optionally the ``eval.image_list`` subset, decoded exactly as
RobustBench does (:mod:`atscale.data.jpeg_eval`); eval.json records which under ``preprocess``. Outputs go to
``eval.out`` (default ``<run>/eval/<suite>``), never over the training run's own files. Under torchrun every rank
evaluates its strided shard of the data and counts are summed.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from atscale import distributed as dist
from atscale.checkpoint import load_checkpoint, model_from_checkpoint, model_from_state
from atscale.config import Config, config_from_yaml_text, parse_override, with_overrides
from atscale.data import make_loader, read_meta
from atscale.data.jpeg_eval import make_jpeg_loader
from atscale.errors import ConfigError, DatasetError
from atscale.evaluation import sanity
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.model_info import find_eval_doc, preprocessing_of, robustbench_model_info
from atscale.evaluation.outputs import robustbench_info, write_outputs
from atscale.evaluation.shift import evaluate_shift, load_baseline
from atscale.evaluation.suites import Suite, get_suite
from atscale.models import NormalizedModel
from atscale.defenses.export import preprocessor_files
from atscale.models.export import export_timm
from atscale.reporting.report import suite_table
from atscale.run_folder import RunFolder
from atscale.runtime import resolve_amp, set_backend_flags

EVAL_SECTIONS = ("eval", "data", "run", "log", "perf")


def dataset_name(meta: dict) -> str:
    src = meta.get("source", "")
    if src == "imagefolder":
        return "imagenet" if meta.get("num_classes") == 1000 else "imagefolder"
    return src


def check_data_fits(root: str, meta: dict) -> None:
    """The evaluation data must have the checkpoint's classes (count and, when both record them, names)."""
    data = read_meta(root)
    n, want = data.get("num_classes"), meta.get("num_classes")
    names, want_names = data.get("classes"), meta.get("classes")
    if n != want or (names and want_names and list(names) != list(want_names)):
        raise DatasetError(f"dataset '{root}' has {n} classes {list(names or [])[:5]}..., but the checkpoint's model "
                           f"was trained on {want} classes {list(want_names or [])[:5]}...",
                           "evaluate on data with the training classes (data.root / --data), or use the run's own")


def jpeg_root_of(cfg: Config, meta: dict) -> Path:
    """``eval.jpeg_root``, else the val folder of the ImageFolder the dataset was built from (``data.src`` or the
    ``src`` recorded in meta.json, ImageNet layout ``<src>/val/<class>/*``)."""
    if cfg.eval.jpeg_root:
        return Path(cfg.eval.jpeg_root)
    src = cfg.data.src or (meta.get("src") if meta.get("source") == "imagefolder" else "")
    if not src:
        raise ConfigError(f"eval.preprocess={cfg.eval.preprocess} reads val JPEGs, but eval.jpeg_root is not set and "
                          "the run records no ImageFolder source (data.src)",
                          "set eval.jpeg_root to the val folder (<root>/<class>/<file>.JPEG)")
    return Path(src) / "val"


def ffcv_record(cfg: Config) -> dict:
    """What eval.json records of an evaluation on the run's val .beton (``preprocess``)."""
    return {"name": "ffcv", "data": str(cfg.data.root), "val_size": cfg.data.val_size,
            "val_crop_ratio": cfg.data.val_crop_ratio}


def eval_loader(cfg: Config, meta: dict, device: torch.device, seed: int) -> tuple[object, dict]:
    """The evaluation batches of this rank and what eval.json records of them (``preprocess``): the run's val
    ``.beton`` for ``eval.preprocess: ffcv``, else the val JPEGs with RobustBench's transforms."""
    ev = cfg.eval
    if ev.preprocess == "ffcv":
        check_data_fits(cfg.data.root, meta)
        loader = make_loader(cfg.data.root, "val", cfg.data, device, seed, train=False,
                             channels_last=cfg.model.channels_last, rank=dist.rank(), world_size=dist.world_size())
        return loader, ffcv_record(cfg)
    root = jpeg_root_of(cfg, meta)
    loader = make_jpeg_loader(root, meta.get("classes") or [], ev.preprocess, device, image_list=ev.image_list,
                              batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                              channels_last=cfg.model.channels_last, rank=dist.rank(), world_size=dist.world_size())
    n = int(dist.all_reduce_sum(torch.tensor(len(loader.samples), device=device)).item())
    return loader, {"name": ev.preprocess, "jpeg_root": str(root), "image_list": ev.image_list or None,
                    "n_images": n}


def _skipped(loader, info: dict, device: torch.device) -> dict:
    """The files the JPEG loader could not decode: counted over ranks, listed from this rank."""
    if info["name"] == "ffcv":
        return info
    count = int(dist.all_reduce_sum(torch.tensor(len(loader.skipped), device=device)).item())
    return {**info, "skipped": {"count": count, "files": list(loader.skipped)}}


def _load(path: str | Path, overrides: Sequence[str]) -> tuple[NormalizedModel, Config, dict, torch.device, list]:
    """The model, the evaluation config, the meta, the device and the eval keys the user set."""
    state = load_checkpoint(path, map_location="cpu")
    cfg = with_overrides(config_from_yaml_text(state["config"]), overrides, EVAL_SECTIONS,
                         origin="the checkpoint's config")
    given = [".".join(parse_override(ov)[0]) for ov in overrides]
    device = dist.init(dist.DistEnv.from_env(), cfg.run.device)
    model, _, meta = model_from_state(state, path, torch.device("cpu"), cfg.eval.bn_domain, cfg.eval.weights)
    return model.to(device), cfg, meta, device, given


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (),
                        sanity_opts: sanity.SanityOptions | None = None) -> dict:
    """Run the configured suite and shift sets on a checkpoint; rank 0 writes eval.json, eval.md, plots and (Linf
    4/255 AutoAttack) robustbench_model_info.json to ``eval.out``. Returns the evaluation document."""
    env = dist.DistEnv.from_env()
    try:
        model, cfg, meta, device, given = _load(path, overrides)
        suite = get_suite(cfg.eval.suite, cfg.eval, given) if cfg.eval.suite or not cfg.eval.shift.roots else None
        return _evaluate(path, model, cfg, meta, device, suite, sanity_opts)
    finally:
        if env.distributed:
            dist.cleanup()


def _evaluate(path, model, cfg: Config, meta: dict, device, suite: Suite | None, sanity_opts) -> dict:
    ev = cfg.eval
    if ev.shift.mce_baseline:
        load_baseline(ev.shift.mce_baseline)  # fail before any evaluation runs
    set_backend_flags(cfg.perf, device)
    amp, seed = resolve_amp(cfg.run.amp, device), cfg.run.seed if ev.seed < 0 else ev.seed
    progress = cfg.log.progress and dist.rank() == 0
    run_dir = RunFolder(Path(path).resolve().parent.parent)  # <run>/checkpoints/<file>
    out_dir = Path(ev.out) if ev.out else run_dir.eval_dir(suite.name if suite else "shift")
    domain = ev.bn_domain or cfg.model.eval_domain or (cfg.model.bn_domains[0] if cfg.model.bn_domains else None)
    doc: dict = {"checkpoint_info": {"checkpoint": str(path), "arch": cfg.model.arch, "bn_domain": domain,
                                     "data": str(cfg.data.root), "dataset": dataset_name(meta),
                                     "num_classes": meta.get("num_classes"), "seed": seed, "weights": ev.weights},
                 "eval_config": cfg.to_dict()["eval"]}
    if suite is not None:
        loader, pre = eval_loader(cfg, meta, device, seed)
        surrogates = {s.source: model_from_checkpoint(s.source, device)[0] for s in suite.attacks if s.source}
        doc.update(run_suite(model, loader, suite, amp_dtype=amp, max_images=ev.max_images, seed=seed,
                             progress=progress, surrogates=surrogates, sanity_opts=sanity_opts))
        doc["preprocess"] = _skipped(loader, pre, device)
        if pre["name"] != "ffcv":
            doc["checkpoint_info"]["data"] = pre["jpeg_root"]
        if dist.rank() == 0:
            sanity.warn([sanity.Flag(**f) for f in doc["flags"]], str(path))
    if ev.shift.roots:
        doc["shift"] = _shift(model, cfg, meta, device, out_dir, amp, seed, progress, doc)
    if dist.rank() == 0:
        _write(path, doc, cfg, meta, suite, out_dir, domain)
    return doc


def _shift(model, cfg: Config, meta: dict, device, out_dir: Path, amp, seed: int, progress: bool, doc: dict) -> list:
    sh = cfg.eval.shift
    layouts = sh.layouts * len(sh.roots) if len(sh.layouts) == 1 else sh.layouts
    clean_err = 1 - doc["results"]["clean"]["acc"] if "results" in doc else None
    return [evaluate_shift(model, root, layout, classes=meta.get("classes") or [], data_cfg=cfg.data, device=device,
                           cache_dir=sh.cache or out_dir / "shift_cache", baseline=sh.mce_baseline or None,
                           clean_error=clean_err, amp_dtype=amp, max_images=sh.max_images,
                           crop_ratio=sh.crop_ratio or None, write_mode=sh.write_mode,
                           channels_last=cfg.model.channels_last, seed=seed, progress=progress)
            for root, layout in zip(sh.roots, layouts)]


def _write(path, doc: dict, cfg: Config, meta: dict, suite: Suite | None, out_dir: Path, domain) -> None:
    title = f"{cfg.model.arch}" + (f" [{domain}]" if domain else "") + (f", suite {suite.name}" if suite else "")
    rb = None
    if suite is not None:
        pre, _ = preprocessing_of(cfg, meta, doc)
        rb = robustbench_info(doc, name=Path(path).resolve().parent.parent.name, arch=cfg.model.arch,
                              dataset=dataset_name(meta), extra={"bn_domain": domain, "checkpoint": str(path),
                                                                 "preprocessing": pre})
        if suite.robustbench and rb is None:
            warnings.warn(f"suite {suite.name!r} asks for RobustBench model info but has no untargeted Linf AutoAttack "
                          "row at eps 4/255 ('standard', or an aggregate of apgd-ce, apgd-t, fab-t and square)",
                          stacklevel=2)
    paths = write_outputs(doc, out_dir, title=title, robustbench=rb)
    doc["paths"] = {k: str(v) for k, v in paths.items()}
    if suite is not None:
        print(suite_table(doc["results"]))
    for s in doc.get("shift", []):
        extra = f", mCE {100 * s['mce']:.2f}%" if s.get("mce") is not None else ""
        print(f"{s['layout']} {s['root']}: accuracy {100 * s['acc']:.2f}% on {s['n']} images{extra}")
    print(f"wrote {paths['json']} and {paths['markdown']}")


def export_checkpoint(path: str | Path, out: str | Path, bn_domain: str = "", eval_json: str | Path = "") -> Path:
    """The checkpoint's model as a folder that plain timm loads (:func:`atscale.models.export.export_timm`), with
    RobustBench's model info filled from the run's config and an evaluation of this checkpoint (``eval_json``, else
    the one :func:`atscale.evaluation.model_info.find_eval_doc` picks; accuracies only under its rule)."""
    model, cfg, meta = model_from_checkpoint(path, torch.device("cpu"), bn_domain)
    if eval_json:
        try:
            doc, source = json.loads(Path(eval_json).read_text()), str(eval_json)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the evaluation '{eval_json}' ({e})", "give an eval.json of atscale eval")
    else:
        doc, source = find_eval_doc(path, "best.pt" if cfg.eval.select_best else "last.pt")
    info = robustbench_model_info(cfg, meta, doc, name=Path(path).resolve().parent.parent.name, eval_source=source)
    return export_timm(model, out, mean=cfg.model.mean, std=cfg.model.std, input_size=cfg.data.val_size,
                       crop_pct=cfg.data.val_crop_ratio, label_names=meta.get("classes"),
                       extra={"checkpoint": str(path), "config": cfg.to_dict()}, robustbench=info,
                       files=preprocessor_files(model))


__all__ = ["evaluate_checkpoint", "export_checkpoint", "check_data_fits", "dataset_name", "eval_loader", "jpeg_root_of",
           "EVAL_SECTIONS"]

