"""One evaluator, one rule: training's quick check (log.jsonl), the final evaluation (eval.json, report.md) and
``atscale eval --suite run`` report the same robust accuracy for the same attack on the same images; every PGD-k can
reach its budget (step max(step, eps/k)) and rows that cannot are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from atscale.config import EvalCfg, load_config
from atscale.errors import ConfigError
from atscale.evaluation.suites import AttackSpec, get_suite, quick_check_suite, run_suite_of
from atscale.reporting.runlog import read_log
from atscale.train import main
from conftest import tiny_overrides


def test_quick_check_final_eval_and_atscale_eval_agree(digits_root, tmp_path: Path, capfd) -> None:
    from atscale.cli import main as cli

    over = tiny_overrides(digits_root, tmp_path, "agree", **{
        "schedule.epochs": 2, "eval.every_epochs": 1, "eval.steps": [1, 3], "eval.quick_steps": 3,
        "eval.eps": 16, "eval.step": 2, "eval.max_images": 150, "eval.quick_images": 150})
    res = main(load_config(None, over))["eval"]
    run = tmp_path / "agree"
    final = json.loads((run / "eval.json").read_text())["results"]
    val = [r for r in read_log(run / "log.jsonl") if r["kind"] == "val"]
    assert len(val) == 2 and val[-1]["attack"] == "pgd3" and val[-1]["n"] == 150
    assert cli(["eval", str(run / "checkpoints" / "last.pt"), "--suite", "run", "--no-progress"]) == 0
    again = json.loads((run / "eval" / "run" / "eval.json").read_text())["results"]
    assert final["pgd3"]["n"] == again["pgd3"]["n"] == 150
    assert val[-1]["pgd_acc"] == final["pgd3"]["acc"] == again["pgd3"]["acc"] == res["pgd3"]["acc"]
    assert val[-1]["clean_acc"] == final["clean"]["acc"] == again["clean"]["acc"]
    assert val[-1]["pgd_adv_acc"] == final["pgd3"]["adv_acc"] == again["pgd3"]["adv_acc"]
    for r in (final, again):  # one rule: robust = clean-correct and attacked-correct
        assert r["pgd1"]["acc"] <= min(r["pgd1"]["adv_acc"], r["clean"]["acc"])
        assert r["pgd1"]["step"] == pytest.approx(16) and r["pgd3"]["step"] == pytest.approx(16 / 3)
    report = (run / "report.md").read_text()
    assert f"| pgd3 | 3 | 16/255 | 5.33/255 | False | {100 * final['pgd3']['acc']:.2f}% |" in report
    assert "clean and attacked" in report


def test_every_pgd_row_can_reach_its_budget() -> None:
    ev = EvalCfg(steps=[10, 100, 2000], eps=16, step=1, targeted=True)  # the Feature Denoising protocol
    rows = {s.label: s for s in run_suite_of(ev).attacks}
    assert {k: r.step_size for k, r in rows.items()} == {"pgd10": 1.6, "pgd100": 1.0, "pgd2000": 1.0}
    for r in rows.values():
        assert r.step_size * r.steps >= r.eps and r.describe()["step"] == r.step_size
    # the run suite's label means the same attack as the fd suite's and the quick check's
    fd = {s.label: s for s in get_suite("fd", EvalCfg()).attacks}
    assert fd["pgd10"].describe() == rows["pgd10"].describe()
    assert quick_check_suite(EvalCfg(eps=16, step=1, quick_steps=10)).attacks[0].describe() == rows["pgd10"].describe()
    assert AttackSpec("p", "pgd", eps=16, steps=4, step=0.5).step_size == 4.0
    assert load_config(None, ["eval.step=0", "eval.eps=8", "eval.steps=[4]"]).eval.step == 0
    assert run_suite_of(load_config(None, ["eval.step=0", "eval.eps=8", "eval.steps=[4]"]).eval).attacks[0] \
        .step_size == 2.0


def test_rows_that_cannot_reach_their_budget_are_refused() -> None:
    with pytest.raises(ConfigError, match="cannot reach eps 16/255"):
        AttackSpec("mi", "mi-fgsm", eps=16, steps=5, step=1)
    with pytest.raises(ConfigError, match="cannot reach eps 16/255"):
        AttackSpec("ti", "ti-fgsm", eps=16, steps=0, step=0.5)  # default 20 iterations of 0.5
    AttackSpec("mi", "mi-fgsm", eps=16, steps=0)  # the thesis default: 20 iterations of 1/255
    with pytest.raises(ConfigError, match="not in kwargs"):
        AttackSpec("p", "pgd", eps=16, steps=10, kwargs={"step": 0.001})
