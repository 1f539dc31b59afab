"""Load-time checks of the ``defense`` section (pre-processing defenses: JATP, ARN, adversarial transformation)."""
from __future__ import annotations

from atscale.config.schema import Config, DefenseCfg
from atscale.errors import ConfigError

__all__ = ["check_defense"]

_BASE_KEYS = ("base_arch", "base_kwargs", "base_from", "delta", "iters", "step", "seed")


def check_defense(cfg: Config) -> None:
    d, default = cfg.defense, DefenseCfg()
    if not d.preprocessor:
        set_keys = [k for k in ("kwargs", "init_from", "train", *_BASE_KEYS) if getattr(d, k) != getattr(default, k)]
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
