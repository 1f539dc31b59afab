"""Typed run configuration, declared once (sections: data, model, attack, objective, optim, schedule, eval, dist,
perf, log, run).

Sections are dataclasses; a YAML file overrides the defaults and ``key.sub=value`` arguments override the YAML.
Unknown keys and values of the wrong type fail before any work, with a message that names the key and what is allowed.
The resolved configuration is written into the run folder (``config.yaml``) and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


@dataclass
class DataCfg:
    """Where the FFCV dataset lives and how batches are decoded and augmented."""

    source: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: str = "data/digits"  # folder holding train.beton, val.beton and meta.json
    src: str = ""  # raw source (ImageFolder tree or CIFAR-10 folder) used when the .beton files are built
    build_if_missing: bool = True
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    image_size: int = 224  # train crop output size
    val_size: int = 224
    val_crop_ratio: float = 0.875  # center crop = val_size / val_crop_ratio resized then cropped (224/256)
    train_crop: Literal["random_resized", "center"] = "random_resized"
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    num_workers: int = 2
    batches_ahead: int = 3  # FFCV decodes this many batches ahead in the background while the GPU computes
    autoaugment: Literal["none", "imagenet", "cifar10", "svhn"] = "none"  # policy on training batches (EfficientNet)
    # progressive resizing ("fast" training, Wong et al. 2020): [{until_epoch: 6, image_size: 128, batch_size: 256}, ...]
    # each phase holds until its until_epoch (exclusive); image_size / batch_size default to the values above
    phases: list[dict[str, Any]] = field(default_factory=list)
    max_resolution: int = 0  # when building: longest side cap, 0 = keep
    jpeg_quality: int = 90  # when building imagefolder / cifar10
    digits_size: int = 32  # when building digits: upsampled side
    digits_val_fraction: float = 0.2


@dataclass
class ModelCfg:
    """A timm architecture, with [0, 1] -> mean/std normalization as its first module."""

    arch: str = "resnet50"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (e.g. channels, stem_width)
    num_classes: int = 0  # 0 = from the dataset's meta.json
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    channels_last: bool = True
    bn_domains: list[str] = field(default_factory=list)  # Mixture BN (Sec 6.4.2): one BN per domain, e.g. [clean, adv]
    eval_domain: str = ""  # the BN domain used for evaluation and kept by export ("" = the first of bn_domains)
    bn_momentum: float = 0.0  # torch convention (TF decay 0.99 = 0.01); 0 = the architecture's default


@dataclass
class AttackCfg:
    """Training attack. Budgets are in 0..255 pixel units (Feature Denoising, Sec 4.5: eps 16, step 1, 30 iters)."""

    name: Literal["pgd", "fgsm", "none"] = "pgd"
    eps: float = 16.0
    step: float = 1.0
    iters: int = 30
    targeted: bool = True
    clean_start_prob: float = 0.2  # per-example probability of starting from the clean image instead of uniform noise
    start_mode: Literal["per_example", "per_batch"] = "per_example"
    target_mode: Literal["random", "least_likely"] = "random"  # targeted: uniform wrong class or the clean argmin
    warmup_epochs: float = 0.0  # eps and step grow linearly from 0 over these first epochs


@dataclass
class ObjectiveCfg:
    """Training objective (Xie thesis Sec 6.3): madry = 100% adv; mixed = a*J(clean) + (1-a)*J(adv) in shared BNs;
    mbn = the same with separate clean / adv BNs (Sec 6.4.2); advprop = J(clean) + J(adv) with auxiliary adv BNs
    (Chapter 7); advprop_fg = fine-grained AdvProp with one more auxiliary BN for AutoAugment images (Sec 7.5.4).
    mbn and advprop need model.bn_domains: [clean, adv]; advprop_fg [clean, aug, adv] and data.autoaugment.
    Peers: ratio = 100% adv + clean_ratio of the clean images (Sec 6.4.1, Fig 6.1); alp = mixed + alp_weight x logit
    pairing (Kannan et al.); trades (Zhang et al., trades_beta); mart (Wang et al., mart_lambda); free = minibatch
    replay free_replays times (Shafahi et al.). "Fast" training is madry with attack.name fgsm (Wong et al.)."""

    name: Literal["madry", "mixed", "mbn", "advprop", "advprop_fg", "clean", "ratio", "alp", "trades", "mart",
                  "free"] = "madry"
    clean_weight: float = 0.5
    label_smoothing: float = 0.1
    clean_ratio: float = 1.0
    alp_weight: float = 0.5
    trades_beta: float = 6.0
    mart_lambda: float = 6.0
    free_replays: int = 4


@dataclass
class OptimCfg:
    """SGD with Nesterov momentum, or TF-style RMSProp (EfficientNet / AdvProp, Xie thesis Sec 7.5.1: decay 0.9,
    momentum 0.9); lr is per 256 images and scaled linearly with the global batch (Goyal et al.)."""

    name: Literal["sgd", "rmsprop_tf"] = "sgd"
    lr: float = 0.1
    ref_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False
    rmsprop_decay: float = 0.9  # rmsprop_tf: decay of the squared-gradient average
    rmsprop_eps: float = 1e-3  # rmsprop_tf: epsilon inside the square root, as TensorFlow's
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights; eval and export use it


@dataclass
class ScheduleCfg:
    """Per-iteration learning-rate schedule: linear warmup then step, cosine or exponential decay (exponential:
    x gamma every ``decay_every_epochs``, staircase, as EfficientNet's 0.97 every 2.4 epochs)."""

    epochs: int = 110
    name: Literal["step", "cosine", "exponential", "linear", "constant"] = "step"
    warmup_epochs: float = 5.0
    milestones: list[float] = field(default_factory=lambda: [35.0, 70.0, 95.0])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    decay_every_epochs: float = 2.4
    bn_eval_last_epochs: int = 0  # BN uses running statistics in the last N epochs (Xie thesis Sec 6.4.3)


@dataclass
class EvalCfg:
    """Evaluation attacks: clean plus PGD-k for each k (Feature Denoising, Sec 4.5: targeted, step 1, random start)."""

    steps: list[int] = field(default_factory=lambda: [10, 100])
    eps: float = 16.0
    step: float = 1.0  # 0 = eps / k for each k
    targeted: bool = True
    random_start: bool = True
    max_images: int = 0  # 0 = the whole val set
    every_epochs: int = 1  # quick clean + PGD check on a val subset during training, 0 = off
    quick_images: int = 512
    quick_steps: int = 10
    early_stop_patience: int = 0  # stop after this many quick checks without a better robust accuracy, 0 = off
    select_best: bool = False  # final eval / export use the weights of the best quick robust accuracy (best.pt)


@dataclass
class LogCfg:
    tensorboard: bool = True
    progress: bool = True
    every_steps: int = 10


@dataclass
class RunCfg:
    out_dir: str = "runs"
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, off on CPU
    threads: int = 0  # torch CPU threads, 0 = torch's default
    resume: str = ""  # "" | auto | path to a checkpoint
    ckpt_every_steps: int = 0  # 0 = at the end of every epoch only
    keep_last: int = 2
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in total, 0 = run to the end
    export: bool = True


@dataclass
class DistCfg:
    """Synchronized SGD: global batch = data.batch_size x world size x grad_accum.

    engine: ddp (DistributedDataParallel) or deepspeed (ZeRO stage ``zero_stage``: 1 partitions optimizer state,
    2 also gradients; bf16/fp16 with fp32 master weights when run.amp asks for it on GPU)."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2] = 1
    grad_accum: int = 1
    sync_bn: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_min: float = 30.0
    gradient_as_bucket_view: bool = True  # DDP: gradients live in the all-reduce buckets (no copy, less memory)
    bucket_cap_mb: float = 25.0  # DDP all-reduce bucket size


@dataclass
class PerfCfg:
    """Speed and memory switches (the two others are run.amp, bf16 on GPU, and model.channels_last).

    compile: ``torch.compile`` of the model in place (attack and update passes; parameter names unchanged) with this
    mode; ``reduce-overhead`` adds CUDA graphs (static shapes: keep drop_last batches and one image size).
    fused_optimizer: auto = fused SGD kernels on CUDA under DDP, foreach elsewhere (timm's RMSpropTF has no fused
    form).
    activation_checkpointing: recompute each residual block in backward (``atscale.layers.checkpointing``) in the
    optimizer's passes (``update``) or in the attack's passes too (``all``, the larger memory saving): less activation
    memory and a larger batch per GPU for one more block forward per backward.
    cudnn_benchmark / tf32: cuDNN autotuning for the fixed input shapes; TF32 matmuls and convolutions where fp32 is
    left (run.amp=off)."""

    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    activation_checkpointing: Literal["off", "update", "all"] = "off"
    cudnn_benchmark: bool = True
    tf32: bool = True


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    perf: PerfCfg = field(default_factory=PerfCfg)
    log: LogCfg = field(default_factory=LogCfg)
    run: RunCfg = field(default_factory=RunCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_CHECKS: dict[str, Any] = {
    "data.batch_size": lambda v: v > 0,
    "data.eval_batch_size": lambda v: v > 0,
    "data.image_size": lambda v: v > 0,
    "data.val_size": lambda v: v > 0,
    "data.val_crop_ratio": lambda v: 0 < v <= 1,
    "data.rrc_scale": lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
    "data.jpeg_quality": lambda v: 1 <= v <= 100,
    "data.digits_val_fraction": lambda v: 0 < v < 1,
    "attack.eps": lambda v: 0 <= v <= 255,
    "attack.step": lambda v: v > 0,
    "attack.iters": lambda v: v >= 1,
    "attack.clean_start_prob": lambda v: 0 <= v <= 1,
    "objective.clean_weight": lambda v: 0 <= v <= 1,
    "objective.label_smoothing": lambda v: 0 <= v < 1,
    "objective.clean_ratio": lambda v: 0 <= v <= 1,
    "objective.alp_weight": lambda v: v >= 0,
    "objective.trades_beta": lambda v: v >= 0,
    "objective.mart_lambda": lambda v: v >= 0,
    "objective.free_replays": lambda v: v >= 1,
    "optim.lr": lambda v: v > 0,
    "optim.momentum": lambda v: 0 <= v < 1,
    "optim.weight_decay": lambda v: v >= 0,
    "optim.rmsprop_decay": lambda v: 0 < v < 1,
    "optim.rmsprop_eps": lambda v: v > 0,
    "model.bn_momentum": lambda v: 0 <= v <= 1,
    "schedule.decay_every_epochs": lambda v: v > 0,
    "schedule.gamma": lambda v: 0 < v <= 1,
    "schedule.bn_eval_last_epochs": lambda v: v >= 0,
    "attack.warmup_epochs": lambda v: v >= 0,
    "optim.ema_decay": lambda v: 0 <= v < 1,
    "eval.early_stop_patience": lambda v: v >= 0,
    "schedule.epochs": lambda v: v >= 1,
    "schedule.warmup_epochs": lambda v: v >= 0,
    "eval.eps": lambda v: 0 <= v <= 255,
    "eval.steps": lambda v: len(v) > 0 and all(k >= 1 for k in v),
    "eval.step": lambda v: v >= 0,
    "dist.grad_accum": lambda v: v >= 1,
    "dist.timeout_min": lambda v: v > 0,
    "dist.bucket_cap_mb": lambda v: v > 0,
    "data.batches_ahead": lambda v: v >= 1,
}
_CHECK_TEXT = {
    "data.rrc_scale": "two numbers 0 < lo <= hi <= 1",
    "data.val_crop_ratio": "a number in (0, 1]",
    "data.jpeg_quality": "an integer in 1..100",
    "attack.eps": "a budget in 0..255 pixel units (16 means 16/255)",
    "eval.eps": "a budget in 0..255 pixel units (16 means 16/255)",
    "eval.steps": "a non-empty list of positive step counts, e.g. [10, 100]",
}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, Sequence):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}' = {value!r} is invalid: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:
        return value
    raise bad


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; allowed keys here: {', '.join(names)}")
        current = getattr(section, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _apply(current, v, key)
        else:
            setattr(section, k, _coerce(v, hints[k], key))


def _validate(cfg: Config) -> None:
    for key, check in _CHECKS.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if not check(value):
            want = _CHECK_TEXT.get(key, "a value in the allowed range")
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: expected {want}")
    if len(cfg.model.mean) != 3 or len(cfg.model.std) != 3 or min(cfg.model.std) <= 0:
        raise ConfigError("config keys 'model.mean' and 'model.std' must be three numbers each, std > 0")
    doms = cfg.model.bn_domains
    if len(set(doms)) != len(doms):
        raise ConfigError(f"config key 'model.bn_domains' = {doms} repeats a domain; list each BN domain once")
    if cfg.model.eval_domain and cfg.model.eval_domain not in doms:
        raise ConfigError(f"config key 'model.eval_domain' = {cfg.model.eval_domain!r} is not one of model.bn_domains "
                          f"{doms}; set model.bn_domains (e.g. [clean, adv]) or leave eval_domain empty")
    from atscale.objectives import SPLIT_BN_OBJECTIVES

    need = SPLIT_BN_OBJECTIVES.get(cfg.objective.name)
    if need and not set(need) <= set(doms):
        raise ConfigError(f"objective.name = {cfg.objective.name!r} trains separate BNs per image source, so it needs "
                          f"a BN model with model.bn_domains: [{', '.join(need)}] (got {doms or 'none'})")
    if cfg.objective.name not in ("madry", "clean") and cfg.attack.name == "none":
        raise ConfigError(f"objective.name = {cfg.objective.name!r} needs an attack; set attack.name to pgd or fgsm")
    if (cfg.eval.early_stop_patience or cfg.eval.select_best) and not cfg.eval.every_epochs:
        raise ConfigError("eval.early_stop_patience / eval.select_best watch the quick robust checks, so they need "
                          "eval.every_epochs >= 1")
    last = 0
    for i, ph in enumerate(cfg.data.phases):
        bad = set(ph) - {"until_epoch", "image_size", "batch_size"}
        if bad or not isinstance(ph.get("until_epoch"), int) or ph["until_epoch"] <= last or any(
                not isinstance(ph.get(k, 1), int) or ph.get(k, 1) < 1 for k in ("image_size", "batch_size")):
            raise ConfigError(f"data.phases[{i}] = {ph} is invalid: each phase is {{until_epoch: int (increasing), "
                              "image_size: int, batch_size: int}}, e.g. [{until_epoch: 6, image_size: 128}, "
                              "{until_epoch: 15, image_size: 224}]")
        last = ph["until_epoch"]
    if cfg.data.phases and last < cfg.schedule.epochs:
        raise ConfigError(f"data.phases end at epoch {last} but schedule.epochs = {cfg.schedule.epochs}; the last "
                          "phase's until_epoch must reach schedule.epochs")
    if cfg.perf.compile != "off" and cfg.perf.activation_checkpointing != "off":
        raise ConfigError("perf.compile with perf.activation_checkpointing is not supported: torch.compile cannot trace "
                          "the checkpoint's recomputation context (pass state, BN statistics); turn one of them off")
    if cfg.perf.compile == "reduce-overhead" and cfg.data.phases:
        raise ConfigError("perf.compile = reduce-overhead records CUDA graphs for fixed shapes, but data.phases change "
                          "the image or batch size; use perf.compile = default or drop data.phases")
    if cfg.dist.engine == "deepspeed" and any("batch_size" in ph for ph in cfg.data.phases):
        raise ConfigError("data.phases with batch_size changes the per-GPU batch, which a DeepSpeed engine fixes at "
                          "start; use dist.engine=ddp or keep one batch_size")
    if cfg.objective.name == "free" and cfg.dist.grad_accum != 1:
        raise ConfigError("objective.name = 'free' replays each minibatch as whole optimizer steps, so it needs "
                          "dist.grad_accum = 1")
    if cfg.objective.name == "advprop_fg" and cfg.data.autoaugment == "none":
        raise ConfigError("objective.name = 'advprop_fg' keeps a BN domain for AutoAugment images, so it needs "
                          "data.autoaugment (e.g. imagenet)")
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError(f"optim.nesterov needs momentum, but optim.momentum = {cfg.optim.momentum}; set "
                          f"optim.nesterov=false for plain SGD, or a momentum > 0 (e.g. 0.9)")
    if cfg.attack.name != "none" and cfg.attack.step > 255:
        raise ConfigError(f"config key 'attack.step' = {cfg.attack.step} is out of range: expected 0..255 pixel units")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], parsed value); the value is read as YAML so lists, numbers and bools work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. attack.eps=8")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}' must name a section and a key, e.g. optim.lr=0.2")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def from_dict(values: dict[str, Any] | None) -> Config:
    cfg = Config()
    _apply(cfg, values or {}, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), twin: str | None = None) -> Config:
    """Defaults <- YAML file [-> its small-scale twin, ``atscale.presets.TWINS``] <- dotted overrides, validated
    before anything runs."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file, e.g. configs/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (data, model, attack, ...)")
        values = loaded or {}
    if twin:
        from atscale.presets import make_twin

        values = make_twin(from_dict(values), twin).to_dict()
    for ov in overrides:
        parts, v = parse_override(ov)
        node = values
        for p_ in parts[:-1]:
            node = node.setdefault(p_, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{p_}' is not a section")
        node[parts[-1]] = v
    return from_dict(values)


def config_from_yaml_text(text: str) -> Config:
    return from_dict(yaml.safe_load(text))


def save_config(cfg: Config, path: str | Path) -> None:
    from atscale.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), cfg.to_yaml().encode())


__all__ = ["Config", "ConfigError", "load_config", "from_dict", "config_from_yaml_text", "save_config"]
