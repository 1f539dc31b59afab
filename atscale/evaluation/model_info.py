"""RobustBench's ``model_info`` JSON for an exported run (the fields of RobustBench's ``model_info/<dataset>/<threat>/
<Name>.json``: link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps,
clean_acc, reported, autoattack_acc, footnote, unreliable), filled from the run's config and one of its evaluations.

What a run cannot know is left an empty string and listed in ``atscale.unknown_fields``: the paper's ``link``,
``authors`` and ``venue``, the accuracy the paper ``reported``; ``additional_data`` too when the weights were
initialized from another model (``model.init_from``), whose training data the run does not record.

Accuracy rule: ``clean_acc`` and ``autoattack_acc`` are RobustBench's numbers only when measured its way, so they are
filled only from an evaluation whose images were pre-processed as RobustBench does (Croce et al. 2021, robustbench
``data.py``): ``eval.preprocess`` one of RobustBench's names on the val JPEGs, or the ``ffcv`` loader on a dataset
stored losslessly at its own size with the identity val crop (digits / CIFAR-10 at ``val_size`` = the stored size and
``val_crop_ratio`` 1, i.e. RobustBench's ``ToTensor`` only). ``autoattack_acc`` also needs an untargeted Linf
AutoAttack row (``standard``, or the worst case of its four attacks) at the reported eps. Otherwise both are empty and
the footnote says why and how to measure them (``atscale eval --suite robustbench eval.preprocess=...``).
"""
from __future__ import annotations

import json
from pathlib import Path

from atscale.config import Config
from atscale.evaluation.outputs import autoattack_entry, pretty_arch

UNKNOWABLE = ("link", "authors", "venue", "reported")


def dataset_of(cfg: Config, meta: dict) -> str:
    """RobustBench's dataset name (imagenet, cifar10) or the run's own source (digits, imagefolder)."""
    src = meta.get("source") or cfg.data.source
    if src == "imagefolder":
        return "imagenet" if meta.get("num_classes") == 1000 else "imagefolder"
    return src


def preprocessing_of(cfg: Config, meta: dict, doc: dict) -> tuple[str, bool]:
    """How the evaluation ``doc`` pre-processed its images, and whether that is RobustBench's way (module doc)."""
    pre = doc.get("preprocess") or {"name": "ffcv", "val_size": cfg.data.val_size,
                                    "val_crop_ratio": cfg.data.val_crop_ratio}
    if pre["name"] != "ffcv":
        listed = f", image list {pre['image_list']}" if pre.get("image_list") else ""
        return f"{pre['name']} (PIL + torchvision on {pre.get('jpeg_root')}{listed})", True
    identity = meta.get("source") in ("digits", "cifar10") and meta.get("image_size") == pre["val_size"] \
        and pre["val_crop_ratio"] == 1.0
    text = f"ffcv val loader, center crop {pre['val_size']} px at ratio {pre['val_crop_ratio']:g}"
    return text + (" (the stored pixels unchanged: RobustBench's ToTensor)" if identity else ""), identity


def _recipe(cfg: Config) -> dict:
    a, o = cfg.attack, cfg.objective
    attack = "none" if a.name == "none" else \
        f"{a.name.upper()}-{a.iters} eps {a.eps:g}/255 step {a.step:g}/255{' targeted' if a.targeted else ''}"
    return {"objective": o.name, "attack": attack, "epochs": cfg.schedule.epochs, "optimizer": cfg.optim.name,
            "lr": cfg.optim.lr, "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
            "init_from": cfg.model.init_from or None}


def _accuracies(cfg: Config, doc: dict | None) -> tuple[float, tuple[str, dict] | None]:
    """The eps reported (the run's eval.eps, else RobustBench's ImageNet 4 or CIFAR 8 when the doc has AutoAttack
    there) and the AutoAttack row at it."""
    if doc:
        for eps in dict.fromkeys((cfg.eval.eps, 4.0, 8.0)):
            found = autoattack_entry(doc["results"], eps)
            if found:
                return eps, found
    return cfg.eval.eps, None


def robustbench_model_info(cfg: Config, meta: dict, doc: dict | None, *, name: str = "",
                           eval_source: str = "") -> dict:
    """RobustBench model info for the run of ``cfg``; accuracies from the evaluation ``doc`` (an eval.json read from
    ``eval_source``) under the module's rule."""
    doc = doc if doc and doc.get("results") else None
    eps, aa = _accuracies(cfg, doc)
    unknown = list(UNKNOWABLE) + (["additional_data"] if cfg.model.init_from else [])
    info = {"link": "", "name": name or cfg.run.name, "authors": "",
            "additional_data": "" if cfg.model.init_from else False, "number_forward_passes": 1,
            "dataset": dataset_of(cfg, meta), "venue": "", "architecture": pretty_arch(cfg.model.arch),
            "eps": f"{eps:g}/255", "clean_acc": "", "reported": "", "autoattack_acc": "", "footnote": "",
            "unreliable": False}
    if doc is None:
        info["footnote"] = "accuracies left empty: no evaluation of this model was found"
        pre, ok = "", False
    else:
        pre, ok = preprocessing_of(cfg, meta, doc)
        info["unreliable"] = any(f.get("severity") == "error" for f in doc.get("flags", []))
        where = f"{doc.get('suite', {}).get('name', '?')!r} suite, {doc.get('n')} images, pre-processing {pre}"
        if ok:
            info["clean_acc"] = f"{100 * doc['results']['clean']['acc']:.2f}"
            info["autoattack_acc"] = f"{100 * aa[1]['acc']:.2f}" if aa else ""
            info["footnote"] = f"atscale eval: {where}" + ("" if aa else f"; no Linf AutoAttack row at {eps:g}/255")
        else:
            info["footnote"] = (f"accuracies left empty: the evaluation ({where}) did not pre-process the images as "
                                "RobustBench does; measure them with `atscale eval CKPT --suite robustbench "
                                "eval.preprocess=BicubicRes256Crop224 eval.jpeg_root=VAL eval.image_list=LIST`")
    info["atscale"] = {"recipe": _recipe(cfg), "unknown_fields": unknown, "eval_json": eval_source or None,
                       "preprocessing": pre or None,
                       "training_data": {"source": meta.get("source") or cfg.data.source, "root": cfg.data.root,
                                         "src": meta.get("src") or cfg.data.src or None,
                                         "num_classes": meta.get("num_classes"), "n_train": meta.get("n_train")}}
    return info


def _evaluated(doc: dict, ckpt: Path) -> bool:
    path = doc.get("checkpoint_info", {}).get("checkpoint")
    return bool(path) and Path(path).resolve() == ckpt.resolve()


def find_eval_doc(ckpt: str | Path, final_name: str = "last.pt") -> tuple[dict | None, str]:
    """The evaluation of checkpoint ``ckpt`` (``<run>/checkpoints/<file>``) to report: the newest ``atscale eval``
    output of that checkpoint (``<run>/eval/*/eval.json``) on the val JPEGs (a RobustBench pre-processing), else the
    newest of them, else, when ``ckpt`` is the model the training run evaluated last (``final_name``: last.pt, or
    best.pt under eval.select_best), the run's final ``<run>/eval.json``. Returns (doc, its path) or (None, "")."""
    ckpt = Path(ckpt)
    run = ckpt.resolve().parent.parent
    docs = []
    for p in sorted((run / "eval").glob("*/eval.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if _evaluated(doc, ckpt) and doc.get("results"):
            docs.append((doc, str(p)))
    jpeg = [d for d in docs if d[0].get("preprocess", {}).get("name", "ffcv") != "ffcv"]
    if jpeg or docs:
        return (jpeg or docs)[0]
    final = run / "eval.json"
    if ckpt.name == final_name and final.is_file():
        try:
            return json.loads(final.read_text()), str(final)
        except ValueError:
            pass
    return None, ""


__all__ = ["robustbench_model_info", "find_eval_doc", "dataset_of", "preprocessing_of", "UNKNOWABLE"]
