"""GPU kinds, the MFU and the papers' published costs for ``atscale plan`` (:mod:`atscale.planning`).

Images/s per GPU = MFU x peak / FLOPs per image, with the dense peak of the precision the run uses (``run.amp``: bf16,
or fp16 on GPUs without bf16; tf32 / fp32 when amp is off) from :data:`GPU_KINDS` (NVIDIA datasheets), and an assumed
model FLOPs utilization (``--mfu``; default: the median ``ours`` MFU measured on a GPU by ``benchmarks/mfu.py`` in
``benchmarks/results/`` when there is one, :func:`measured_mfu`, else :data:`DEFAULT_MFU`).

:data:`PUBLISHED_COSTS` holds the training costs the papers report (ImageNet-Adversarial-Training, Xie thesis Sec 4.5;
Wong et al. 2020 Sec 5.3; Shafahi et al. 2019), each with its source.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from atscale.config import Config
from atscale.errors import ConfigError

DEFAULT_MFU = 0.35
DEFAULT_MFU_SOURCE = ("assumed, not measured: no GPU result of benchmarks/mfu.py in benchmarks/results/ yet "
                      "(bash benchmarks/gpu_suite.sh measures one; --mfu sets it)")
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class GpuKind:
    """Dense (no sparsity) peak TFLOP/s of one GPU: ``half`` is bf16 (fp16 where the GPU has no bf16, ``half_dtype``),
    ``tf32`` the TF32 tensor-core rate (the fp32 rate where there is none); ``match``: substrings of
    ``torch.cuda.get_device_name``."""

    name: str
    half: float
    tf32: float
    fp32: float
    source: str
    half_dtype: str = "bf16"
    match: tuple[str, ...] = ()


# NVIDIA datasheets, dense figures (the datasheets' headline tensor figures are 2x these, with sparsity)
GPU_KINDS: dict[str, GpuKind] = {
    "v100": GpuKind("V100 SXM2", 125.0, 15.7, 15.7, "NVIDIA V100 datasheet (fp16 tensor cores; no bf16 or tf32)",
                    "fp16", ("V100",)),
    "a100": GpuKind("A100 SXM 40/80GB", 312.0, 156.0, 19.5, "NVIDIA A100 datasheet", match=("A100",)),
    "h100": GpuKind("H100 SXM", 989.4, 494.7, 66.9, "NVIDIA H100 datasheet (SXM5)",
                    match=("H100 80GB HBM3", "H100 SXM")),
    "h100-pcie": GpuKind("H100 PCIe", 756.0, 378.0, 51.2, "NVIDIA H100 datasheet (PCIe)", match=("H100 PCIe",)),
    "h200": GpuKind("H200 SXM", 989.4, 494.7, 66.9, "NVIDIA H200 datasheet (same compute as H100 SXM)",
                    match=("H200",)),
    "l40s": GpuKind("L40S", 362.05, 183.0, 91.6, "NVIDIA L40S datasheet", match=("L40S",)),
    "a10": GpuKind("A10", 125.0, 62.5, 31.2, "NVIDIA A10 datasheet", match=("A10",)),
    "p100": GpuKind("P100 PCIe", 18.7, 9.3, 9.3, "NVIDIA P100 datasheet (PCIe; SXM2: 21.2 / 10.6); no tensor cores",
                    "fp16", ("P100",)),
    "rtx2080ti": GpuKind("RTX 2080 Ti", 53.8, 13.4, 13.4, "NVIDIA Turing whitepaper (fp16 tensor, fp32 accumulate)",
                         "fp16", ("2080 Ti",)),
}


@dataclass(frozen=True)
class PublishedCost:
    """A paper's own training run: ``gpus`` x ``hours`` on ``gpu_kind`` (a :data:`GPU_KINDS` key) in ``precision``
    (half | fp32), with the citation it comes from."""

    gpus: int
    gpu_kind: str
    hours: float
    precision: str
    source: str


PUBLISHED_COSTS: dict[str, PublishedCost] = {
    "r152_iat": PublishedCost(128, "v100", 52.0, "fp32", "facebookresearch/ImageNet-Adversarial-Training "
                              "INSTRUCTIONS.md, Training Speed: ResNet-152 baseline, PGD-30, about 52 hours on 128 "
                              "V100s (TensorFlow fp32; the fp16 XLA attack flag off)"),
    "r152_iat_denoise": PublishedCost(128, "v100", 90.0, "fp32", "facebookresearch/ImageNet-Adversarial-Training "
                                      "INSTRUCTIONS.md, Training Speed: ResNet-152 Denoise about 90 hours on 128 "
                                      "V100s (its softmax non-local op lacked an efficient GPU kernel)"),
    "fast_r50_eps2": PublishedCost(4, "rtx2080ti", 12.0, "half", "Wong et al. 2020 (Fast is better than free), "
                                   "Sec 5.3 and locuslab/fast_adversarial README: ResNet-50, eps 2, 12 hours on one "
                                   "machine with four RTX 2080 Ti (apex mixed precision)"),
    "free_r50_eps2": PublishedCost(4, "p100", 48.0, "fp32", "Shafahi et al. 2019 (Adversarial training for free!), "
                                   "abstract: a workstation with 4 P100 GPUs and 2 days of runtime (ResNet-50, m=4, "
                                   "eps 2: 40% PGD accuracy); Wong et al. 2020 list it as 52 hours"),
}


def peak_for(kind: GpuKind, cfg: Config) -> tuple[float, str]:
    """The dense peak for the run's precision (``run.amp``; auto = bf16 on GPU) and its name."""
    if cfg.run.amp in ("auto", "bf16", "fp16"):
        return kind.half, "fp16" if cfg.run.amp == "fp16" else kind.half_dtype
    return (kind.tf32, "tf32") if cfg.perf.tf32 and kind.tf32 != kind.fp32 else (kind.fp32, "fp32")


def measured_mfu(arch: str) -> tuple[float, str] | None:
    """The median ``ours`` MFU of the GPU results of ``benchmarks/mfu.py`` in ``benchmarks/results/`` (rows of
    ``arch`` when there are any), with the files it comes from; None without a GPU result."""
    rows: dict[str, list[tuple[float, str]]] = {}
    for path in sorted(RESULTS_DIR.glob("*mfu*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("benchmark") != "mfu" or doc.get("device", {}).get("type") != "cuda":
            continue
        for r in doc.get("rows", []):
            if isinstance(r.get("ours"), dict) and r["ours"].get("mfu"):
                rows.setdefault(r.get("model", ""), []).append((float(r["ours"]["mfu"]), path.name))
    chosen = rows.get(arch) or [v for vs in rows.values() for v in vs]
    if not chosen:
        return None
    files = sorted({f for _, f in chosen})
    return statistics.median(v for v, _ in chosen), f"median measured MFU of benchmarks/results/{', '.join(files)}"


def check_kinds(kinds: list[str]) -> list[str]:
    """``--gpu-kind`` names (all kinds when empty), each a key of :data:`GPU_KINDS`."""
    bad = [k for k in kinds if k not in GPU_KINDS]
    if bad:
        raise ConfigError(f"--gpu-kind {', '.join(bad)} is unknown", f"use one of {', '.join(GPU_KINDS)}")
    return kinds or list(GPU_KINDS)


def kind_of_device(name: str) -> str | None:
    """The :data:`GPU_KINDS` key of a CUDA device name (a match ends at a non-alphanumeric: A10 is not A100 or A10G)."""
    for key, kind in GPU_KINDS.items():
        if any(re.search(re.escape(m) + r"(?![0-9A-Za-z])", name) for m in kind.match):
            return key
    return None

