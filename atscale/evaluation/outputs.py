"""What an evaluation writes: ``eval.json`` (the evaluator's document), ``eval.md`` (tables, sanity flags, plots),
``accuracy_vs_iterations.png`` / ``accuracy_vs_eps.png`` and, for the Linf 4/255 AutoAttack track, RobustBench's
``model_info`` JSON.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from atscale.fsio import atomic_write_text
from atscale.reporting.report import plot_accuracy_vs_eps, plot_accuracy_vs_iterations, suite_markdown


def autoattack_entry(results: dict, eps: float = 4.0, norm: str = "linf") -> tuple[str, dict] | None:
    """The AutoAttack result at ``eps`` (0..255 units): a ``standard`` row, else a worst-case aggregate over the four
    AutoAttack components (APGD-CE, APGD-T, FAB-T, Square) at that eps."""
    for label, r in results.items():
        if r.get("attack") == "standard" and r.get("norm") == norm and math.isclose(r["eps"], eps) \
                and not r.get("targeted"):
            return label, r
    parts = {"apgd-ce", "apgd-t", "fab-t", "square"}
    for label, r in results.items():
        if r.get("kind") == "aggregate" and math.isclose(r["eps"], eps) and \
                parts <= {results[m]["attack"] for m in r["of"]}:
            return label, r
    return None


_ARCH_NAMES = [(r"^wide_resnet(\d+)_(\d+)", r"WideResNet-\1-\2"), (r"^resnext(\d+)_(\w+)", r"ResNeXt-\1-\2"),
               (r"^resnet(\d+)", r"ResNet-\1"), (r"^efficientnet_(b\d)", r"EfficientNet-\1"),
               (r"^vit_(\w+)_patch(\d+)", r"ViT-\1/\2")]


def pretty_arch(arch: str) -> str:
    for pat, rep in _ARCH_NAMES:
        m = re.match(pat, arch)
        if m:
            return m.expand(rep).replace("EfficientNet-b", "EfficientNet-B") + arch[m.end():]
    return arch


def robustbench_info(doc: dict, *, name: str, arch: str, dataset: str, eps: float = 4.0,
                     extra: dict | None = None) -> dict | None:
    """RobustBench ``model_info`` JSON for the Linf eps/255 track (accuracies as percent strings, two decimals)."""
    found = autoattack_entry(doc["results"], eps)
    if found is None:
        return None
    label, r = found
    info = {"link": "", "name": name, "authors": "", "additional_data": False, "number_forward_passes": 1,
            "dataset": dataset, "venue": "", "architecture": pretty_arch(arch), "eps": f"{eps:g}/255",
            "clean_acc": f"{100 * doc['results']['clean']['acc']:.2f}", "reported": "",
            "autoattack_acc": f"{100 * r['acc']:.2f}", "footnote": f"atscale suite {doc['suite']['name']!r}, "
                                                                  f"{doc['n']} images, attack row {label!r}",
            "unreliable": any(f["severity"] == "error" for f in doc.get("flags", [])), "threat_model": "Linf",
            "n_images": doc["n"]}
    info.update(extra or {})
    return info


def write_outputs(doc: dict, out_dir: str | Path, *, title: str = "", robustbench: dict | None = None) -> dict:
    """eval.json, eval.md, accuracy_vs_iterations.png, accuracy_vs_eps.png [, robustbench_model_info.json]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    res = doc.get("results")
    if res:
        paths["iterations_plot"] = plot_accuracy_vs_iterations(res, out / "accuracy_vs_iterations.png", title)
        paths["eps_plot"] = plot_accuracy_vs_eps(res, out / "accuracy_vs_eps.png", title)
    if robustbench is not None:
        paths["robustbench"] = out / "robustbench_model_info.json"
        paths["robustbench"].write_text(json.dumps(robustbench, indent=2))
        doc["robustbench"] = robustbench
    paths["json"] = out / "eval.json"
    atomic_write_text(paths["json"], json.dumps(doc, indent=2))
    paths["markdown"] = out / "eval.md"
    plots = [p for k, p in paths.items() if k.endswith("_plot")]
    atomic_write_text(paths["markdown"], suite_markdown(doc, title, plots))
    return paths


__all__ = ["autoattack_entry", "pretty_arch", "robustbench_info", "write_outputs"]
