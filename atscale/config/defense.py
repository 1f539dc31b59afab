"""Load-time checks of the ``defense`` section (pre-processing defenses: JATP, ARN, adversarial transformation)."""
from __future__ import annotations

from atscale.config.schema import PREPROCESSOR_OBJECTIVES, Config, DefenseCfg
from atscale.errors import ConfigError

__all__ = ["check_defense"]

_BASE_KEYS = ("base_arch", "base_kwargs", "base_from", "delta", "iters", "step", "seed")


def check_defense(cfg: Config) -> None:
    d, default = cfg.defense, DefenseCfg()
    _check_objective(cfg)
    if not d.preprocessor:
        set_keys = [k for k in ("kwargs", "init_from", "train", "feature_layer", *_BASE_KEYS)
                    if getattr(d, k) != getattr(default, k)]
        if set_keys:
            raise ConfigError(f"defense.{set_keys[0]} is set but defense.preprocessor is empty",
                              "name a pre-processor (nrp, hgd_unet, ape_g, arn, adv_transform) or drop the defense keys")
        return
    if d.preprocessor != "adv_transform":
        extra = [k for k in _BASE_KEYS if getattr(d, k) != getattr(default, k)]
        if extra:
            raise ConfigError(f"defense.{extra[0]} belongs to the adversarial transformation, but defense.preprocessor "
                              f"= {d.preprocessor!r}", "drop it, or use defense.preprocessor=adv_transform")
    elif d.train == "preprocessor":
        raise ConfigError("defense.train = preprocessor, but the adversarial transformation has no weights to train "
                          "(its f_b stays fixed, Xiao & Zheng 2020 Sec 3.2)", "use defense.train=classifier")
    if not 0 < d.delta <= 255 or d.iters < 1 or not 0 <= d.step <= 255:
        raise ConfigError(f"defense.delta = {d.delta}, defense.iters = {d.iters}, defense.step = {d.step}: expected "
                          "0 < delta <= 255 and 0 <= step <= 255 (0..255 pixel units; step 0 = delta / 6), iters >= 1")
    if d.train == "preprocessor" and not cfg.model.init_from:
        raise ConfigError("defense.train = preprocessor keeps the classifier fixed, so it must be the trained target, "
                          "but model.init_from is empty", "set model.init_from to the target's atscale checkpoint "
                          "(.pt) or export folder (local-dir:DIR)")
    if cfg.model.bn_domains:
        raise ConfigError("model.bn_domains (Mixture BN) with a pre-processing defense is not supported",
                          "drop model.bn_domains or defense.preprocessor")


def _check_objective(cfg: Config) -> None:
    """The pre-processor objectives (JATP, its static-example twin, HGD) need a trainable pre-processor network."""
    name, d = cfg.objective.name, cfg.defense
    if name not in PREPROCESSOR_OBJECTIVES:
        return
    if d.preprocessor in ("", "adv_transform"):
        raise ConfigError(f"objective.name = {name} trains a pre-processor, but defense.preprocessor = "
                          f"{d.preprocessor!r}", "set defense.preprocessor to nrp, hgd_unet, ape_g or arn")
    own = {"ape_g": "ape_g", "arn": "arn"}.get(name)
    if own and d.preprocessor != own:
        raise ConfigError(f"objective.name = {name} trains its own network, but defense.preprocessor = "
                          f"{d.preprocessor!r}", f"use defense.preprocessor={own}")
    if name == "arn":
        _check_arn(cfg)
    allowed = ("preprocessor", "both") if name == "jatp" else ("preprocessor",)
    if d.train not in allowed:
        raise ConfigError(f"objective.name = {name} with defense.train = {d.train}: expected "
                          f"{' or '.join(allowed)}", "JATP' (joint) is jatp with defense.train=both; the baselines "
                          "train the pre-processor against a fixed target")
    if name in ("jatp", "nrp_static") and not d.feature_layer:
        raise ConfigError(f"objective.name = {name} compares feature maps of the target (JATP Eq. 5, 8), but "
                          "defense.feature_layer is empty", "name a module of the classifier, e.g. layer3.1.conv2 "
                          "for a ResNet-18")
    if name != "arn" and (cfg.attack.name == "none" or (name == "jatp" and cfg.attack.name != "pgd")):
        raise ConfigError(f"objective.name = {name} with attack.name = {cfg.attack.name}: its adversarial examples "
                          "come from " + ("PGD (attack.eps / step / iters drive Eq. 5)" if name == "jatp" else
                                          "the training attack on the target"), "use attack.name=pgd")


def _check_arn(cfg: Config) -> None:
    rows = cfg.objective.arn_attacks
    if cfg.attack.name != "none":
        raise ConfigError(f"objective.name = arn crafts its examples with objective.arn_attacks, but attack.name = "
                          f"{cfg.attack.name}", "set attack.name=none and list ARN's seen attacks in "
                          "objective.arn_attacks")
    bad = [r for r in rows if not isinstance(r, dict) or not {"attack", "eps", "steps"} <= set(r)]
    if not rows or bad:
        raise ConfigError(f"objective.arn_attacks = {rows}: each seen attack needs attack, eps (0..255) and steps",
                          "e.g. [{attack: pgd, eps: 8, steps: 10, step: 2}, {attack: pgd, norm: l2, eps: 128, "
                          "steps: 10}]")

