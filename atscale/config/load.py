"""Loading a configuration: defaults <- YAML file [<- small-scale twin] <- ``section.key=value`` overrides, then one
validation pass (types, ranges, combinations) before any work. Every failure is a :class:`ConfigError` naming the key
and the allowed values. Imports only :mod:`atscale.config.schema`, :mod:`atscale.config.twins` and the base layer.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from atscale.config.defense import check_defense
from atscale.config.schema import MIXUP_OBJECTIVES, PHASE_KEYS, SPLIT_BN_OBJECTIVES, Config, DataCfg
from atscale.config.twins import make_twin
from atscale.errors import ConfigError
from atscale.fsio import atomic_write_bytes

DATASET_META = "meta.json"  # what every dataset folder holds (atscale.data.write.META; config does not import data)

_CHECKS: dict[str, Any] = {
    "data.batch_size": lambda v: v > 0,
    "data.eval_batch_size": lambda v: v > 0,
    "data.image_size": lambda v: v > 0,
    "data.val_size": lambda v: v > 0,
    "data.val_crop_ratio": lambda v: 0 < v <= 1,
    "data.rrc_scale": lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
    "data.jpeg_quality": lambda v: 1 <= v <= 100,
    "data.digits_val_fraction": lambda v: 0 < v < 1,
    "data.mixup.mixup_alpha": lambda v: v >= 0,
    "data.mixup.cutmix_alpha": lambda v: v >= 0,
    "data.mixup.prob": lambda v: 0 <= v <= 1,
    "data.mixup.switch_prob": lambda v: 0 <= v <= 1,
    "data.randaugment_ops": lambda v: v >= 0,
    "data.randaugment_magnitude": lambda v: 0 <= v <= 30,
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
    "optim.betas": lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
    "optim.adam_eps": lambda v: v > 0,
    "optim.layer_decay": lambda v: 0 < v <= 1,
    "optim.clip_grad_norm": lambda v: v >= 0,
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
    "data.num_workers": lambda v: v >= 1,
    "log.every_steps": lambda v: v >= 1,
    "run.keep_last": lambda v: v >= 1,
    "run.ckpt_every_steps": lambda v: v >= 0,
    "run.max_steps": lambda v: v >= 0,
    "run.threads": lambda v: v >= 0,
    "eval.max_images": lambda v: v >= 0,
    "eval.quick_images": lambda v: v >= 0,
    "eval.quick_steps": lambda v: v >= 1,
    "eval.every_epochs": lambda v: v >= 0,
    "eval.shift.max_images": lambda v: v >= 0,
    "eval.shift.crop_ratio": lambda v: 0 <= v <= 1,
}
_CHECK_TEXT = {
    "data.rrc_scale": "two numbers 0 < lo <= hi <= 1",
    "data.val_crop_ratio": "a number in (0, 1]",
    "data.jpeg_quality": "an integer in 1..100",
    "attack.eps": "a budget in 0..255 pixel units (16 means 16/255)",
    "eval.eps": "a budget in 0..255 pixel units (16 means 16/255)",
    "eval.steps": "a non-empty list of positive step counts, e.g. [10, 100]",
    "eval.step": "a step in 0..255 pixel units (0 = eps / k)",
    "log.every_steps": "a positive number of steps",
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


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_ranges(cfg: Config) -> None:
    for key, check in _CHECKS.items():
        value = _lookup(cfg, key)
        if not check(value):
            want = _CHECK_TEXT.get(key, "a value in the allowed range")
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: expected {want}")
    if cfg.attack.name != "none" and cfg.attack.step > 255:
        raise ConfigError(f"config key 'attack.step' = {cfg.attack.step} is out of range: expected 0..255 pixel units")
    if cfg.eval.step > 255:
        raise ConfigError(f"config key 'eval.step' = {cfg.eval.step} is out of range: expected 0..255 pixel units")


def _bn_domain_name_problem(name: Any) -> str:
    """Why ``name`` cannot be a Mixture BN domain (they become nn.ModuleDict keys and state-dict key parts), or ''."""
    from torch import nn

    if not isinstance(name, str) or not name or "." in name:
        return "a domain is a non-empty name without '.'"
    if name in dir(nn.ModuleDict()):
        return f"'{name}' is an nn.ModuleDict attribute"
    return ""


def _check_model(cfg: Config) -> None:
    if len(cfg.model.mean) != 3 or len(cfg.model.std) != 3 or min(cfg.model.std) <= 0:
        raise ConfigError("config keys 'model.mean' and 'model.std' must be three numbers each, std > 0")
    doms = cfg.model.bn_domains
    if len(set(doms)) != len(doms):
        raise ConfigError(f"config key 'model.bn_domains' = {doms} repeats a domain; list each BN domain once")
    for d in doms:
        why = _bn_domain_name_problem(d)
        if why:
            raise ConfigError(f"config key 'model.bn_domains' = {doms}: {why}; use names such as clean, adv, aug")
    for key, value in (("model.eval_domain", cfg.model.eval_domain), ("eval.bn_domain", cfg.eval.bn_domain)):
        if value and value not in doms:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of model.bn_domains {doms or '(none)'}; "
                              "name one of those domains or leave it empty")
    need = SPLIT_BN_OBJECTIVES.get(cfg.objective.name)
    if need and not set(need) <= set(doms):
        raise ConfigError(f"objective.name = {cfg.objective.name!r} trains separate BNs per image source, so it needs "
                          f"a BN model with model.bn_domains: [{', '.join(need)}] (got {doms or 'none'})")


def _check_phases(cfg: Config) -> None:
    last = 0
    for i, ph in enumerate(cfg.data.phases):
        bad = set(ph) - set(PHASE_KEYS)
        if bad or not isinstance(ph.get("until_epoch"), int) or ph["until_epoch"] <= last or any(
                not isinstance(ph.get(k, 1), int) or ph.get(k, 1) < 1
                for k in ("image_size", "batch_size", "attack_iters")) or any(
                not isinstance(ph.get(k, 1), (int, float)) or ph.get(k, 1) < 0 for k in ("attack_eps", "attack_step")) \
                or not 0 <= ph.get("token_drop", 0) < 1:
            raise ConfigError(f"data.phases[{i}] = {ph} is invalid: each phase is {{until_epoch: int (increasing), "
                              "image_size: int, batch_size: int, attack_iters: int, attack_eps / attack_step: 0..255 "
                              "units, token_drop: [0, 1)} (every key but until_epoch optional), e.g. "
                              "[{until_epoch: 6, image_size: 128, attack_iters: 2}, {until_epoch: 15, image_size: 224}]")
        last = ph["until_epoch"]
    if cfg.data.phases and last < cfg.schedule.epochs:
        raise ConfigError(f"data.phases end at epoch {last} but schedule.epochs = {cfg.schedule.epochs}; the last "
                          "phase's until_epoch must reach schedule.epochs")


# (condition, message): combinations of valid values that do not work together
_CONFLICTS: list[tuple[Any, str]] = [
    (lambda c: c.objective.name not in ("madry", "clean", "arn") and c.attack.name == "none",
     "objective.name = {c.objective.name!r} needs an attack; set attack.name to pgd or fgsm"),
    (lambda c: (c.eval.early_stop_patience or c.eval.select_best) and not c.eval.every_epochs,
     "eval.early_stop_patience / eval.select_best watch the quick robust checks, so they need eval.every_epochs >= 1"),
    (lambda c: c.perf.compile != "off" and c.perf.activation_checkpointing != "off",
     "perf.compile with perf.activation_checkpointing is not supported: torch.compile cannot trace the checkpoint's "
     "recomputation context (pass state, BN statistics); turn one of them off"),
    (lambda c: c.perf.compile == "reduce-overhead" and c.data.phases,
     "perf.compile = reduce-overhead records CUDA graphs for fixed shapes, but data.phases change the image or batch "
     "size; use perf.compile = default or drop data.phases"),
    (lambda c: c.dist.engine == "deepspeed" and any("batch_size" in ph for ph in c.data.phases),
     "data.phases with batch_size changes the per-GPU batch, which a DeepSpeed engine fixes at start; use "
     "dist.engine=ddp or keep one batch_size"),
    (lambda c: c.objective.name == "free" and c.dist.grad_accum != 1,
     "objective.name = 'free' replays each minibatch as whole optimizer steps, so it needs dist.grad_accum = 1"),
    (lambda c: c.objective.name == "advprop_fg" and c.data.autoaugment == "none",
     "objective.name = 'advprop_fg' keeps a BN domain for AutoAugment images, so it needs data.autoaugment "
     "(e.g. imagenet)"),
    (lambda c: c.optim.name == "sgd" and c.optim.nesterov and c.optim.momentum <= 0,
     "optim.nesterov needs momentum, but optim.momentum = {c.optim.momentum}; set optim.nesterov=false for plain SGD, "
     "or a momentum > 0 (e.g. 0.9)"),
    (lambda c: c.data.mixup.on and c.objective.name not in MIXUP_OBJECTIVES,
     "data.mixup with objective.name = {c.objective.name!r}: mixed soft targets are defined for the cross-entropy "
     "objectives (" + ", ".join(MIXUP_OBJECTIVES) + "); turn data.mixup off or pick one of those"),
    (lambda c: c.data.mixup.on and (c.data.batch_size % 2 or any(ph.get("batch_size", 2) % 2
                                                                  for ph in c.data.phases)),
     "data.mixup pairs image i with image B-1-i of a batch, so it needs even batch sizes (data.batch_size = "
     "{c.data.batch_size}); use an even data.batch_size (and phase batch_size)"),
    (lambda c: c.data.mixup.on and c.attack.targeted and c.attack.mixup_labels == "soft",
     "a targeted attack draws its target from a hard label, but attack.mixup_labels = 'soft'; set "
     "attack.mixup_labels=hard or attack.targeted=false (the ARES recipe attacks the soft targets untargeted)"),
    (lambda c: c.attack.name == "apgd" and (c.attack.warmup == "step" and c.attack.warmup_epochs > 0
                                            or any("attack_step" in ph for ph in c.data.phases)),
     "attack.name = 'apgd' adapts its own step (2 eps at first), so attack.warmup=step and phase attack_step have "
     "nothing to set; use attack.warmup=eps_and_step (or no warmup) and drop attack_step from data.phases"),
    (lambda c: c.attack.name == "apgd" and c.objective.name in ("trades", "free"),
     "objective.name = {c.objective.name!r} runs its own inner maximisation from attack.eps / attack.step, not the "
     "attack object, so attack.name = 'apgd' would not apply; use attack.name=pgd"),
    (lambda c: c.data.randaugment_ops > 0 and c.data.autoaugment != "none",
     "data.randaugment_ops and data.autoaugment are two augmentation policies; keep one of them"),
    (lambda c: c.eval.image_list and c.eval.preprocess == "ffcv",
     "eval.image_list names val JPEG files, which the ffcv pre-processing does not read; set eval.preprocess "
     "(e.g. BicubicRes256Crop224, RobustBench's ImageNet pre-processing) or drop eval.image_list"),
    (lambda c: c.dist.engine == "deepspeed" and c.run.amp in ("bf16", "fp16") and c.run.device == "cpu",
     "dist.engine=deepspeed with run.amp={c.run.amp} needs a GPU; on CPU use run.amp=off (or auto)"),
]


SHIFT_LAYOUTS = ("folder", "imagenet-c", "imagenet-a", "stylized")


def _check_shift(cfg: Config) -> None:
    sh = cfg.eval.shift
    bad = [x for x in sh.layouts if x not in SHIFT_LAYOUTS]
    if bad:
        raise ConfigError(f"eval.shift.layouts {bad} are unknown", f"use {', '.join(SHIFT_LAYOUTS)}")
    if sh.layouts and not sh.roots:
        raise ConfigError("eval.shift.layouts (--shift-layout) given without a test set", "add eval.shift.roots "
                                                                                         "(--shift-root)")
    if sh.roots and len(sh.layouts) not in (1, len(sh.roots)):
        raise ConfigError(f"{len(sh.layouts)} shift layouts for {len(sh.roots)} shift roots",
                          "give one layout for all roots or one per folder (--shift-layout)")


def _validate(cfg: Config) -> None:
    """Every check of a whole config, before any work: ranges, model and BN domains, phases, conflicts."""
    _check_ranges(cfg)
    _check_shift(cfg)
    _check_model(cfg)
    _check_phases(cfg)
    check_defense(cfg)
    for bad, message in _CONFLICTS:
        if bad(cfg):
            raise ConfigError(message.format(c=cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], parsed value); the value is read as YAML so lists, numbers and bools work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value", "write e.g. attack.eps=8")
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
    """Defaults <- YAML file [-> its small-scale twin, :data:`atscale.config.twins.TWINS`] <- dotted overrides, validated
    before anything runs (a ``data.root`` override to a folder without a dataset needs ``data.source`` with it)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file, e.g. configs/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML ({' '.join(str(e).split())})",
                              "fix the file's syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (data, model, attack, ...)")
        values = loaded or {}
    if twin:
        values = make_twin(from_dict(values), twin).to_dict()
    origin = f"--twin {twin}" if twin else f"the config file '{path}'" if "source" in _data_of(values) else \
        "the defaults"
    before = _data_of(values).get("root", DataCfg.root)
    _set_overrides(values, overrides)
    cfg = from_dict(values)
    _check_data_root(cfg, overrides, before, origin)
    return cfg


def _set_overrides(values: dict[str, Any], overrides: Sequence[str]) -> None:
    for ov in overrides:
        parts, v = parse_override(ov)
        node = values
        for p_ in parts[:-1]:
            node = node.setdefault(p_, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{p_}' is not a section", "name a section.key, e.g. eval.eps=8")
        node[parts[-1]] = v


def _data_of(values: dict[str, Any]) -> dict[str, Any]:
    data = values.get("data")
    return data if isinstance(data, dict) else {}


def _check_data_root(cfg: Config, overrides: Sequence[str], before: Any, origin: str) -> None:
    """Refuse a ``data.root`` override that moves the data to a folder holding no dataset while ``data.source`` is
    inherited from ``origin``: training would quietly build that source there (a typo would train on fresh digits).
    Looks at the filesystem only (no dataset is read)."""
    given = {".".join(parse_override(ov)[0]) for ov in overrides}
    d = cfg.data
    if "data.root" not in given or "data.source" in given or Path(str(before)) == Path(d.root):
        return
    builds = d.build_if_missing and (d.source == "digits" or bool(d.src))
    if not builds or (Path(d.root) / DATASET_META).is_file():
        return
    raise ConfigError(f"data.root override '{d.root}' holds no dataset (no {DATASET_META} there), and data.source="
                      f"{d.source} comes from {origin}, not from the overrides, so {d.source} data would be built "
                      "at that path", f"fix the path, or pass data.source={d.source} explicitly to build it there")


def with_overrides(cfg: Config, overrides: Sequence[str], sections: Sequence[str] = (),
                   origin: str = "the config being overridden") -> Config:
    """A validated copy of ``cfg`` with ``section.key=value`` overrides; ``sections``, when given, are the only
    sections they may touch (``atscale eval`` rebuilds the model from the checkpoint, so model.* stays fixed).
    ``origin`` names ``cfg`` in errors."""
    for ov in overrides:
        section = parse_override(ov)[0][0]
        if sections and section not in sections:
            raise ConfigError(f"override '{ov}' changes the '{section}' section, which comes from the checkpoint here",
                              f"override only {', '.join(s + '.*' for s in sections)}")
    values = cfg.to_dict()
    _set_overrides(values, overrides)
    new = from_dict(values)
    _check_data_root(new, overrides, cfg.data.root, origin)
    return new


def config_from_yaml_text(text: str) -> Config:
    return from_dict(yaml.safe_load(text))


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_bytes(Path(path), cfg.to_yaml().encode())


__all__ = ["load_config", "from_dict", "config_from_yaml_text", "save_config", "parse_override", "with_overrides"]
