"""Configuration (bottom layer): the typed sections of a run (:mod:`.schema`), budget units and the one PGD step rule
(:mod:`.units`), loading with overrides and validation (:mod:`.load`) and the small-scale twins of the paper presets
(:mod:`.twins`). Imports nothing of atscale but :mod:`atscale.errors` and :mod:`atscale.fsio`.
"""
from atscale.config.load import (config_from_yaml_text, from_dict, load_config, parse_override, save_config,
                                 with_overrides)
from atscale.config.schema import (SPLIT_BN_OBJECTIVES, AttackCfg, Config, DataCfg, DefenseCfg, DistCfg, EvalCfg, LogCfg,
                                   ModelCfg, ObjectiveCfg, OptimCfg, PerfCfg, RunCfg, ScheduleCfg, ShiftCfg)
from atscale.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataCfg", "DefenseCfg", "ModelCfg", "AttackCfg", "ObjectiveCfg", "OptimCfg", "ScheduleCfg",
           "EvalCfg", "ShiftCfg", "LogCfg", "RunCfg", "DistCfg", "PerfCfg", "SPLIT_BN_OBJECTIVES", "load_config",
           "from_dict", "config_from_yaml_text", "save_config", "parse_override", "with_overrides"]
