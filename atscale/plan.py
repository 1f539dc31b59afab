"""``atscale plan``: the compute a training preset needs: FLOPs per training image, images/s per GPU kind, GPU-hours
and wall time on N GPUs, and the published cost of the paper's own run where one is known.

FLOPs are counted, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; convolutions,
matmuls and attention; elementwise ops, BN and softmax uncounted; grouped convolutions' weight gradients counted
correctly, :func:`conv_backward_flop`) over the real parts of one training step, built
from the config and run on fake tensors (``FakeTensorMode``: every op and shape, no arithmetic; real CPU arithmetic
where an op has no fake kernel), for each ``data.phases`` phase (image size, attack iterations, token drop):

- forward F: one eval-mode forward of the atscale model (``atscale.models.build_from_config``);
- attack: the objective's ``make_adv`` (the training attack of ``attack.*``) with 1 and with 2 iterations; their
  difference is one attack step (about 2F: forward plus input-gradient backward with frozen parameters,
  ``atscale.attacks.base``), and the rest is the attack's fixed part, so k iterations cost fixed + k x step;
- update: ``atscale.training.loop.train_step`` (attack, objective, backward; the optimizer's elementwise update is
  not counted) minus its attack: about 3F per image through the loss, on the clean + adversarial concatenation for
  mixed / mbn / advprop / alp / trades / mart (6F), three domains for advprop_fg (9F), 1 + r for ratio;
- per image = replays x (attack + update) (free training replays each minibatch ``objective.free_replays`` times).

Images/s per GPU = MFU x peak / FLOPs per image, with the dense peak of the precision the run uses (``run.amp``: bf16,
or fp16 on GPUs without bf16; tf32 / fp32 when amp is off) from :data:`GPU_KINDS`, and an assumed model FLOPs
utilization (``--mfu``; default: the median ``ours`` MFU measured on a GPU by ``benchmarks/mfu.py`` in
``benchmarks/results/`` when there is one, else :data:`DEFAULT_MFU`). Wall time on N GPUs assumes linear scaling
(no communication, input-pipeline or evaluation time). ``--measure`` times real training steps on this machine.

Feature Denoising (Xie thesis Sec 4.5): PGD-30 adversarial training multiplies a step's cost by about (2k + 3) / 3 = 21;
:data:`PUBLISHED_COSTS` holds the costs the papers report, each with its source.
"""
from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

from atscale.config import Config
from atscale.errors import ConfigError

DEFAULT_MFU = 0.35
DEFAULT_MFU_SOURCE = ("assumed, not measured: no GPU result of benchmarks/mfu.py in benchmarks/results/ yet "
                      "(bash benchmarks/gpu_suite.sh measures one; --mfu sets it)")
RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT_GPUS = 8
# training images when data.root holds no meta.json yet (ImageNet-1k train split; CIFAR-10 train split)
DEFAULT_IMAGES = {"imagefolder": 1_281_167, "cifar10": 50_000}
COUNTER = ("torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add; conv / matmul / attention "
           "only; forward = eval-mode forward, attack = objective.make_adv, update = train_step minus attack")
SCALING = "linear in the GPU count: no communication, data-loading, evaluation or checkpoint time"


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


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase: epochs ``start``..``end`` at ``image_size`` with the attack's ``attack_iters`` / eps /
    step (0..255 units) and ``token_drop`` (timm's ``patch_drop_rate`` in the optimizer's passes; ``data.phases``,
    the whole run when there are none)."""

    index: int
    start: int
    end: int
    image_size: int
    batch_size: int
    attack_iters: int
    attack_eps: float
    attack_step: float
    token_drop: float

    @property
    def epochs(self) -> int:
        return self.end - self.start


@dataclass
class PhaseCost:
    """Counted FLOPs per training image of one phase (see the module docstring)."""

    spec: PhaseSpec
    forward: float
    attack_step: float
    attack_fixed: float
    update: float
    replays: int
    counted_on: str = "cpu"  # fake (FakeTensorMode: no arithmetic) | cpu

    @property
    def attack(self) -> float:
        return self.attack_fixed + self.spec.attack_iters * self.attack_step

    @property
    def per_image(self) -> float:
        return self.replays * (self.attack + self.update)


def phases_of(cfg: Config) -> list[PhaseSpec]:
    """The run's phases (``data.phases``, Wong et al.'s progressive resizing / AdvXL's coarse-to-fine stages), each
    key unset in a phase taking the run's value."""
    d, a = cfg.data, cfg.attack
    raw = d.phases or [{"until_epoch": cfg.schedule.epochs}]
    base_drop = float(cfg.model.kwargs.get("patch_drop_rate", 0.0))
    out, start = [], 0
    for i, ph in enumerate(raw):
        out.append(PhaseSpec(i, start, int(ph["until_epoch"]), int(ph.get("image_size", d.image_size)),
                             int(ph.get("batch_size", d.batch_size)), int(ph.get("attack_iters", a.iters)),
                             float(ph.get("attack_eps", a.eps)), float(ph.get("attack_step", a.step)),
                             float(ph.get("token_drop", base_drop))))
        start = out[-1].end
    return out


def _meta(cfg: Config) -> dict[str, Any]:
    path = Path(cfg.data.root) / "meta.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def dataset_images(cfg: Config, images: int | None = None) -> tuple[int, str]:
    """Training images per epoch before batching, and where the number comes from: ``--images``, else ``meta.json``
    of ``data.root``, else the source's standard train split (digits: the split ``atscale data digits`` writes)."""
    if images is not None:
        return images, "--images"
    meta = _meta(cfg)
    if meta.get("n_train"):
        return int(meta["n_train"]), f"{Path(cfg.data.root) / 'meta.json'}"
    if cfg.data.source == "digits":
        from atscale.data.sources import digits_splits

        train, _, _ = digits_splits(8, cfg.data.digits_val_fraction, cfg.run.seed, cfg.data.digits_classes)
        return len(train.labels), "scikit-learn digits, the split atscale data digits writes"
    return DEFAULT_IMAGES[cfg.data.source], f"the {cfg.data.source} train split by default, --images N to change"


def num_classes(cfg: Config) -> int:
    meta = _meta(cfg)
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if meta.get("num_classes"):
        return int(meta["num_classes"])
    return {"imagefolder": 1000}.get(cfg.data.source, 10)


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed: bool,
                       _output_padding, _groups, output_mask, out_shape, **_: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: torch's count of the input gradient, and the weight gradient counted
    as the forward convolution (the same multiply-adds). torch's own formula ignores ``groups`` in the weight
    gradient, counting a depthwise convolution's (EfficientNet, ConvNeXt) ``groups`` times over."""
    from torch.utils.flop_counter import conv_flop_count

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def _counter():
    """``FlopCounterMode`` with :func:`conv_backward_flop` and without its per-module tracker: the tracker's backward
    hooks refuse ``torch.autograd.grad`` on leaf inputs ("A leaf node was passed to _will_engine_execute_node"),
    which every attack calls; the global count (all this module reads) is the same."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    class _Global:
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *exc: Any) -> bool:
            return False

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    counter.mod_tracker = _Global()
    return counter


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (forward and backward ops alike), counted by ``FlopCounterMode``."""
    with _counter() as c:
        fn()
    return float(c.get_total_flops())


def probe_batch(cfg: Config) -> int:
    """Images per counted step: 2 (BN in train mode needs two), or enough for ``objective.clean_ratio`` to keep its
    exact share of clean images (CleanRatio keeps round(r n))."""
    if cfg.objective.name != "ratio":
        return 2
    return max(2, Fraction(cfg.objective.clean_ratio).limit_denominator(10).denominator)


def _model(cfg: Config, spec: PhaseSpec, device):
    """The run's model in train mode, with the phase's token drop (timm ``patch_drop_rate``) when it has one."""
    from atscale.models import build_from_config

    model_cfg = cfg.model
    if spec.token_drop > 0 or "patch_drop_rate" in model_cfg.kwargs:
        model_cfg = replace(model_cfg, kwargs={**model_cfg.kwargs, "patch_drop_rate": spec.token_drop})
    return build_from_config(model_cfg, num_classes(cfg)).to(device).train()


def _attack(cfg: Config, spec: PhaseSpec, iters: int, amp_dtype=None, seed: int = 0):
    from atscale.attacks import build_attack

    return build_attack(replace(cfg.attack, iters=iters, eps=spec.attack_eps, step=spec.attack_step), amp_dtype,
                        seed=seed)


def _objective(cfg: Config, seed: int = 0, counting: bool = False):
    """The objective and the loop's batch augmentation (AutoAugment; advprop_fg applies its own). ``counting``: an
    identity in AutoAugment's place (its per-image draws read values, which fake tensors cannot, and it has no
    counted FLOPs)."""
    from atscale.data.augment import AutoAugmentBatch
    from atscale.training.objectives import build_objective

    augment = AutoAugmentBatch(cfg.data.autoaugment, seed) if cfg.data.autoaugment != "none" else None
    if counting and augment is not None:
        augment = _identity
    return build_objective(cfg.objective, augment), (augment if cfg.objective.name != "advprop_fg" else None)


def _identity(x):
    return x


def _batch(cfg: Config, n: int, size: int, device, classes: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g).to(device)
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (n,), generator=g).to(device)


@contextlib.contextmanager
def _stochastic_attack(on: bool) -> Iterator[None]:
    """``attack.stochastic_layers`` as the run sets it: dropout-like layers (PatchDropout's token drop included) draw
    in the attack's passes too, which changes the attack's FLOPs."""
    from atscale.layers import context

    before = context.stochastic_attack()
    context.set_stochastic_attack(on)
    try:
        yield
    finally:
        context.set_stochastic_attack(before)


def count_phase(cfg: Config, spec: PhaseSpec, fake: bool = True) -> PhaseCost:
    """Count one phase's FLOPs per image on CPU (see the module docstring): forward, the attack at 1 and 2
    iterations, and one real ``train_step``. ``fake``: run them on fake tensors (``FakeTensorMode``: shapes and ops
    without arithmetic, seconds for any model), falling back to real CPU arithmetic for an op that has no fake
    kernel or whose output shape depends on data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _stochastic_attack(cfg.attack.stochastic_layers):
        if fake:
            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    return replace(_count_phase(cfg, spec), counted_on="fake")
            except (RuntimeError, NotImplementedError):
                pass
        return _count_phase(cfg, spec)


def _count_phase(cfg: Config, spec: PhaseSpec) -> PhaseCost:
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from atscale.distributed.updater import DDPUpdater
    from atscale.training.loop import train_step

    cpu, n = torch.device("cpu"), probe_batch(cfg)
    with unset_fake_temporarily():  # real parameters; the inputs make the ops fake
        model, (objective, _) = _model(cfg, spec, cpu), _objective(cfg, counting=True)
        attack1, attack2 = _attack(cfg, spec, 1), _attack(cfg, spec, 2)
        updater = DDPUpdater(model, torch.optim.SGD(model.parameters(), lr=0.0), cpu, accum=1, amp_dtype=None)
    x, y = _batch(cfg, n, spec.image_size, cpu, num_classes(cfg))
    model.eval()
    with torch.no_grad():
        forward = count_flops(lambda: model(x))
    model.train()
    run_attack = objective.needs_attack and cfg.objective.name != "free"
    a1 = count_flops(lambda: objective.make_adv(model, attack1, x, y)) if run_attack else 0.0
    a2 = count_flops(lambda: objective.make_adv(model, attack2, x, y)) if run_attack else 0.0
    step = count_flops(lambda: train_step(updater, attack1, objective, x, y, amp_dtype=None))
    return PhaseCost(spec, forward / n, (a2 - a1) / n, (2 * a1 - a2) / n, (step - a1) / n, objective.replays)


def _peak(kind: GpuKind, cfg: Config) -> tuple[float, str]:
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


def epoch_images(images: int, spec: PhaseSpec, gpus: int, accum: int) -> int:
    """Images one epoch trains on with ``gpus`` ranks: each rank takes images // gpus and drops its last partial
    batch, and an epoch keeps whole optimizer steps of ``accum`` micro-batches (``atscale.data.loaders``)."""
    micro = images // gpus // spec.batch_size // accum * accum
    if micro == 0:
        raise ConfigError(f"phase {spec.index}: {images} images on {gpus} GPUs give no full batch of "
                          f"{spec.batch_size} x dist.grad_accum {accum} per GPU",
                          "use fewer GPUs, a smaller data.batch_size or more images")
    return micro * spec.batch_size * gpus


def measure_phase(cfg: Config, spec: PhaseSpec, batch: int = 0, steps: int = 3) -> dict[str, Any]:
    """Time ``steps`` real training steps (after one untimed) of ``spec`` on this machine (``run.device``; amp,
    channels_last and the optimizer as the run has them; synthetic [0, 1] images, no torch.compile): images/s and
    the FLOP/s it implies. ``batch`` 0 = the phase's per-GPU batch on CUDA, 2 on CPU."""
    import torch

    from atscale.distributed import resolve_device
    from atscale.distributed.updater import DDPUpdater
    from atscale.runtime import resolve_amp, set_backend_flags
    from atscale.training.loop import train_step
    from atscale.training.optim import build_optimizer, use_fused

    device = resolve_device(cfg.run.device)
    set_backend_flags(cfg.perf, device)
    amp = resolve_amp(cfg.run.amp, device)
    n = batch or (spec.batch_size if device.type == "cuda" else max(2, probe_batch(cfg)))
    model, attack = _model(cfg, spec, device), _attack(cfg, spec, spec.attack_iters, amp, cfg.run.seed)
    objective, augment = _objective(cfg, cfg.run.seed)
    fused = use_fused(cfg.perf.fused_optimizer, cfg.optim.name, device, cfg.dist.engine)
    updater = DDPUpdater(model, build_optimizer(model, cfg.optim, n, fused), device, accum=1, amp_dtype=amp)
    x, y = _batch(cfg, n, spec.image_size, device, num_classes(cfg))

    def step() -> None:
        xb = augment(x) if augment is not None else x
        for _ in range(objective.replays):
            train_step(updater, attack, objective, xb, y, amp_dtype=amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "amp": str(amp).replace("torch.", "") if amp else "fp32", "batch": n, "steps": steps,
            "seconds_per_step": statistics.median(times), "images_per_s": n / statistics.median(times)}


def _kind_of_device(name: str) -> str | None:
    """The :data:`GPU_KINDS` key of a CUDA device name (a match ends at a non-alphanumeric: A10 is not A100 or A10G)."""
    for key, kind in GPU_KINDS.items():
        if any(re.search(re.escape(m) + r"(?![0-9A-Za-z])", name) for m in kind.match):
            return key
    return None


def _phase_row(cost: PhaseCost, images: int, gpus: int, accum: int) -> dict[str, Any]:
    s = cost.spec
    seen = epoch_images(images, s, gpus, accum)
    g = 1e-9
    return {"index": s.index, "epochs": [s.start, s.end], "image_size": s.image_size, "batch_size_per_gpu":
            s.batch_size, "attack_iters": s.attack_iters, "attack_eps": s.attack_eps, "token_drop": s.token_drop,
            "forward_gflops": cost.forward * g, "attack_step_gflops": cost.attack_step * g,
            "attack_fixed_gflops": cost.attack_fixed * g, "attack_gflops": cost.attack * g,
            "update_gflops": cost.update * g, "replays": cost.replays, "gflops_per_image": cost.per_image * g,
            "forward_equivalents": cost.per_image / cost.forward, "images_per_epoch": seen,
            "optimizer_steps": s.epochs * seen // (s.batch_size * gpus * accum) * cost.replays,
            "flops": s.epochs * seen * cost.per_image, "counted_on": cost.counted_on}


def _kind_row(key: str, cfg: Config, rows: list[dict[str, Any]], gpus: int, mfu: float) -> dict[str, Any]:
    kind = GPU_KINDS[key]
    peak, precision = _peak(kind, cfg)
    rate = mfu * peak * 1e12
    seconds = sum(r["flops"] for r in rows) / rate
    return {"kind": key, "name": kind.name, "precision": precision, "peak_tflops": peak, "peak_source": kind.source,
            "images_per_s_per_gpu": [rate / (r["gflops_per_image"] * 1e9) for r in rows],
            "gpu_hours": seconds / 3600, "wall_hours": seconds / 3600 / gpus}


def _published(name: str, total_flops: float, cfg: Config, mfu: float) -> dict[str, Any] | None:
    pub = PUBLISHED_COSTS.get(name)
    if pub is None:
        return None
    kind = GPU_KINDS[pub.gpu_kind]
    peak = kind.half if pub.precision == "half" else kind.fp32
    projected = total_flops / (mfu * _peak(kind, cfg)[0] * 1e12) / 3600
    return {**asdict(pub), "gpu_hours": pub.gpus * pub.hours, "peak_tflops_of_its_precision": peak,
            "implied_mfu": total_flops / (pub.gpus * pub.hours * 3600 * peak * 1e12),
            "projected_gpu_hours_same_kind": projected, "projected_wall_hours_same_gpus": projected / pub.gpus}


def plan(cfg: Config, gpus: int = DEFAULT_GPUS, kinds: list[str] | None = None, mfu: float | None = None,
         images: int | None = None, measure: bool = False, measure_batch: int = 0, measure_steps: int = 3,
         config_path: str = "") -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs of each of ``kinds`` (all when empty) as a JSON-able dict."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} is not a GPU count", "give --gpus 1 or more")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is not a utilization", "give a fraction in (0, 1], e.g. --mfu 0.35")
    kinds = check_kinds(list(kinds or []))
    n, n_source = dataset_images(cfg, images)
    if n < 1:
        raise ConfigError(f"--images {n} is not a dataset size", "give --images 1 or more")
    mfu_value, mfu_source = (mfu, "--mfu") if mfu is not None else (measured_mfu(cfg.model.arch) or
                                                                    (DEFAULT_MFU, DEFAULT_MFU_SOURCE))
    specs = phases_of(cfg)
    for s in specs:  # a phase without a full batch fails before any counting
        epoch_images(n, s, gpus, cfg.dist.grad_accum)
    costs = [count_phase(cfg, s) for s in specs]
    rows = [_phase_row(c, n, gpus, cfg.dist.grad_accum) for c in costs]
    total = sum(r["flops"] for r in rows)
    out = {"preset": cfg.run.name, "config": config_path, "model": cfg.model.arch, "objective": cfg.objective.name,
           "attack": cfg.attack.name, "epochs": cfg.schedule.epochs, "dataset_images": n, "dataset_source": n_source,
           "gpus": gpus, "grad_accum": cfg.dist.grad_accum, "scaling": SCALING, "mfu": mfu_value,
           "mfu_source": mfu_source, "counter": COUNTER, "phases": rows, "total_flops": total,
           "gpu_kinds": [_kind_row(k, cfg, rows, gpus, mfu_value) for k in kinds],
           "published": _published(cfg.run.name, total, cfg, mfu_value), "measured": None}
    if measure:
        out["measured"] = [_measured_row(cfg, c, measure_batch, measure_steps) for c in costs]
    return out


def _measured_row(cfg: Config, cost: PhaseCost, batch: int, steps: int) -> dict[str, Any]:
    with _stochastic_attack(cfg.attack.stochastic_layers):
        m = measure_phase(cfg, cost.spec, batch, steps)
    m["achieved_tflops"] = m["images_per_s"] * cost.per_image / 1e12
    key = _kind_of_device(m["device"])
    if key is not None:
        m["gpu_kind"], m["mfu"] = key, m["achieved_tflops"] / _peak(GPU_KINDS[key], cfg)[0]
    return {"phase": cost.spec.index, **m}


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.2g} s"
    return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} d)"


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_plan(p: dict[str, Any]) -> str:
    """The plan as text: the phases' FLOPs, then one line per GPU kind, the published cost and any measurement."""
    lines = [f"atscale plan: {p['preset']} ({p['config'] or 'config'}): {p['model']}, objective {p['objective']}, "
             f"attack {p['attack']}, {p['epochs']} epochs of {p['dataset_images']:,} images ({p['dataset_source']})",
             ""]
    head = ["phase", "epochs", "px", "batch/GPU", "attack iters", "fwd GFLOP", "attack", "update", "per image",
            "x fwd"]
    lines += _table([head] + [[str(r["index"]), f"{r['epochs'][0]}-{r['epochs'][1]}", str(r["image_size"]),
                               str(r["batch_size_per_gpu"]), str(r["attack_iters"]), f"{r['forward_gflops']:.3g}",
                               f"{r['attack_gflops']:.4g}", f"{r['update_gflops']:.4g}",
                               f"{r['gflops_per_image']:.4g}", f"{r['forward_equivalents']:.1f}"]
                              for r in p["phases"]])
    lines += ["", f"total {p['total_flops']:.3g} FLOPs ({p['counter']})",
              f"MFU {p['mfu']:.2f} ({p['mfu_source']}); wall time on {_gpus(p['gpus'])}, {p['scaling']}", ""]
    head = ["GPU", "precision", "peak TFLOP/s", "img/s/GPU per phase", "GPU-hours", f"wall on {_gpus(p['gpus'])}"]
    lines += _table([head] + [[k["name"], k["precision"], f"{k['peak_tflops']:g}",
                               " / ".join(f"{v:,.0f}" if v >= 10 else f"{v:.2g}" for v in k["images_per_s_per_gpu"]),
                               f"{k['gpu_hours']:,.0f}" if k["gpu_hours"] >= 10 else f"{k['gpu_hours']:.2g}",
                               _hours(k["wall_hours"])] for k in p["gpu_kinds"]])
    pub = p["published"]
    if pub:
        kind = GPU_KINDS[pub["gpu_kind"]].name
        lines += ["", f"published: {pub['hours']:g} h on {pub['gpus']} {kind} = {pub['gpu_hours']:,.0f} GPU-hours "
                      f"({pub['precision']}); the FLOPs counted here imply MFU {pub['implied_mfu']:.2f} of its "
                      f"{pub['peak_tflops_of_its_precision']:g} TFLOP/s peak; this plan on {pub['gpus']} {kind} at MFU "
                      f"{p['mfu']:.2f}: {_hours(pub['projected_wall_hours_same_gpus'])}",
                  f"  source: {pub['source']}"]
    for m in p["measured"] or []:
        extra = f", MFU {m['mfu']:.2f} of {m['gpu_kind']}" if "mfu" in m else ""
        lines.append(f"measured phase {m['phase']} on {m['device']} ({m['amp']}, batch {m['batch']}): "
                     f"{m['images_per_s']:.3g} img/s, {m['achieved_tflops']:.3g} TFLOP/s{extra}")
    return "\n".join(lines)


def run_plan(config: str, overrides: list[str], gpus: int = DEFAULT_GPUS, kinds: list[str] | None = None,
             mfu: float | None = None, images: int | None = None, measure: bool = False, measure_batch: int = 0,
             measure_steps: int = 3, as_json: bool = False) -> int:
    """``atscale plan``: load ``config`` with ``overrides``, print the plan (text or JSON); returns 0."""
    from atscale.config import load_config

    check_kinds(list(kinds or []))
    cfg = load_config(config, overrides)
    p = plan(cfg, gpus, kinds, mfu, images, measure, measure_batch, measure_steps, config)
    print(json.dumps(p, indent=1) if as_json else format_plan(p))
    return 0


__all__ = ["GPU_KINDS", "GpuKind", "PUBLISHED_COSTS", "PublishedCost", "PhaseSpec", "PhaseCost", "DEFAULT_MFU",
           "phases_of", "dataset_images", "count_flops", "count_phase", "measure_phase", "measured_mfu",
           "epoch_images", "check_kinds", "plan", "format_plan", "run_plan"]
