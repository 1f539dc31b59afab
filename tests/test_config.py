"""Config: YAML + dotted overrides, typed, unknown keys and bad values rejected with messages that name the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from atscale.config import Config, ConfigError, config_from_yaml_text, load_config


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("attack:\n  eps: 8\n  iters: 3\nmodel:\n  kwargs: {channels: [8, 16, 32, 64]}\n")
    cfg = load_config(p, ["attack.iters=7", "eval.steps=[10, 100]", "attack.targeted=false", "run.name=x"])
    assert cfg.attack.eps == 8.0 and isinstance(cfg.attack.eps, float)
    assert cfg.attack.iters == 7 and cfg.attack.targeted is False
    assert cfg.eval.steps == [10, 100] and cfg.model.kwargs == {"channels": [8, 16, 32, 64]}
    assert cfg.run_dir == Path("runs/x")


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = load_config(None, ["optim.lr=0.3", "schedule.milestones=[1, 2]", "data.rrc_scale=[0.5, 1.0]"])
    assert config_from_yaml_text(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("override, pattern", [
    (["attack.epss=8"], r"unknown config key 'attack.epss'; allowed keys here: name, eps, step"),
    (["atack.eps=8"], r"unknown config key 'atack'; allowed keys here: data, model, defense, attack"),
    (["attack.iters=three"], r"'attack.iters' = 'three' is invalid: expected int"),
    (["attack.iters=2.5"], r"'attack.iters' = 2.5 is invalid: expected int"),
    (["attack.targeted=maybe"], r"'attack.targeted' = 'maybe' is invalid: expected bool"),
    (["objective.name=trades2"], r"'objective.name' = 'trades2' is invalid: expected one of 'madry', 'mixed', 'mbn', 'advprop'"),
    (["schedule.name=triangle"], r"'schedule.name' = 'triangle' is invalid: expected one of 'step', 'cosine'"),
    (["eval.steps=10"], r"'eval.steps' = 10 is invalid: expected a list of int"),
    (["attack.eps=300"], r"'attack.eps' = 300.0 is out of range: expected a budget in 0..255 pixel units"),
    (["data.rrc_scale=[0.9, 0.1]"], r"'data.rrc_scale' .* expected two numbers 0 < lo <= hi <= 1"),
    (["optim.momentum=0"], r"optim.nesterov needs momentum, but optim.momentum = 0.0; set optim.nesterov=false"),
    (["optim.momentum=-0.5"], r"'optim.momentum' = -0.5 is out of range"),
    (["attack"], r"is not of the form section.key=value"),
    (["eps=3"], r"must name a section and a key"),
])
def test_bad_overrides_fail_with_clear_messages(override: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, override)


def test_bad_yaml_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model: resnet50\n")
    with pytest.raises(ConfigError, match="'model' must be a mapping of arch, kwargs"):
        load_config(bad)


def test_presets_shipped_in_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(f for f in root.rglob("*.yaml") if f.parent != root / "dense")  # dense: test_dense_runs.py
    assert files, "no presets found"
    for f in files:
        assert isinstance(load_config(f), Config), f


def test_cli_reports_config_errors_before_any_work(tmp_path: Path, capfd) -> None:
    from atscale.cli import main

    rc = main(["train", "--config", "configs/demo.yaml", f"run.out_dir={tmp_path}", "optim.lrr=1"])
    assert rc == 2
    err = capfd.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "allowed keys here: name, lr, ref_batch" in err
    assert not any(tmp_path.iterdir())


def test_exponent_floats_from_the_command_line() -> None:
    """YAML 1.1 reads 1e-4 (no dot) as a string; float keys accept it, anything non-numeric still fails."""
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    with pytest.raises(ConfigError, match="'optim.lr' = 'fast' is invalid: expected float"):
        load_config(None, ["optim.lr=fast"])
