"""`atscale eval` / `atscale export` on a real checkpoint, LR schedule and weight-decay groups, and the mixed
objective with FGSM and bf16 autocast through a real training run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atscale.config import ScheduleCfg, load_config
from atscale.models import create_model
from atscale.training.optim import build_optimizer, lr_factor, param_groups
from atscale.reporting.runlog import read_log
from atscale.train import main
from conftest import tiny_overrides


def test_cli_eval_writes_eval_json_and_plot(trained_digits_model, tmp_path: Path, capfd) -> None:
    from atscale.cli import main as cli

    _, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    rc = cli(["eval", "--checkpoint", str(ckpt), "--attacks", "pgd1,pgd3", "--eps", "16", "--step", "4",
              "--targeted", "--max-images", "100", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    res = doc["results"]
    assert set(res) == {"clean", "pgd1", "pgd3"} and doc["suite"]["name"] == "run"
    assert res["clean"]["n"] == 100 and res["pgd3"]["targeted"] is True and res["pgd3"]["eps"] == pytest.approx(16)
    # the one step rule: max(step, eps / k), so each PGD-k can reach the boundary of its budget
    assert res["pgd1"]["step"] == pytest.approx(16) and res["pgd3"]["step"] == pytest.approx(16 / 3)
    assert res["pgd3"]["step_rule"] == "max(step, eps / k)"
    assert res["pgd3"]["acc"] < res["clean"]["acc"] and res["pgd3"]["acc"] <= res["pgd3"]["adv_acc"]
    assert 0 <= res["pgd1"]["success_rate"] <= 1 and 0 <= res["pgd3"]["success_rate"] <= 1
    assert doc["checkpoint_info"]["checkpoint"] == str(ckpt) and doc["eval_config"]["eps"] == 16
    assert (tmp_path / "accuracy_vs_iterations.png").stat().st_size > 1000
    assert "| pgd3 | pgd | white-box |" in capfd.readouterr().out
    assert cli(["eval", "--checkpoint", str(ckpt), "--attacks", "autoatack"]) == 2
    assert "unknown attack 'autoatack'" in capfd.readouterr().err
    assert cli(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").is_file() and (tmp_path / "exp" / "config.json").is_file()


def test_lr_schedule_warmup_step_and_cosine() -> None:
    step = ScheduleCfg(epochs=10, name="step", warmup_epochs=2, milestones=[5, 8], gamma=0.1)
    spe = 100
    assert lr_factor(0, spe, step) == pytest.approx(1 / 200)
    assert lr_factor(99, spe, step) == pytest.approx(0.5)
    assert lr_factor(199, spe, step) == pytest.approx(1.0)
    assert lr_factor(499, spe, step) == pytest.approx(1.0)
    assert lr_factor(500, spe, step) == pytest.approx(0.1)
    assert lr_factor(800, spe, step) == pytest.approx(0.01)
    cos = ScheduleCfg(epochs=10, name="cosine", warmup_epochs=0, min_lr_ratio=0.0)
    assert lr_factor(0, spe, cos) == pytest.approx(1.0)
    assert lr_factor(500, spe, cos) == pytest.approx(0.5)
    assert lr_factor(999, spe, cos) < 1e-3


def test_weight_decay_skips_norm_and_bias_and_lr_scales_with_batch() -> None:
    model = create_model("resnet18", 10, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]})
    decay, no_decay = param_groups(model, 1e-4, decay_norm_and_bias=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 1e-4
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert all("bn" in names[id(p)] or "fc.bias" in names[id(p)] or "downsample.1" in names[id(p)]
               for p in no_decay["params"])
    opt = build_optimizer(model, load_config(None, []).optim, global_batch=4096)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 4096 / 256)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9


def test_mixed_objective_with_fgsm_and_bf16_autocast_trains(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "mixed", **{
        "objective.name": "mixed", "objective.clean_weight": 0.5, "attack.name": "fgsm", "attack.step": 40,
        "run.amp": "bf16", "run.max_steps": 4, "log.every_steps": 1}))
    out = main(cfg)
    assert out["stopped"] and out["step"] == 4
    train = [r for r in read_log(tmp_path / "mixed" / "log.jsonl") if r["kind"] == "train"]
    assert len(train) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) and 0 <= r["clean_acc"] <= 1 for r in train)
    assert train[0]["lr"] < train[-1]["lr"]  # warming up
