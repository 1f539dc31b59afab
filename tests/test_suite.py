"""Evaluation suites on a real trained digits checkpoint: named suites as data, `atscale eval CKPT --suite` writing
eval.json / eval.md / plots / RobustBench model info with consistent numbers, and 2 gloo ranks under torchrun counting
every image exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atscale.config import ConfigError
from atscale.config import EvalCfg
from atscale.evaluation.suites import AttackSpec, build_attack, get_suite, suite_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_named_suites_follow_the_protocols() -> None:
    fd = get_suite("fd", EvalCfg())
    rows = {s.label: s for s in fd.attacks}
    assert list(rows) == ["pgd10", "pgd100", "pgd1000", "pgd2000"]
    assert all(s.eps == 16 and s.targeted and s.random_start and s.attack == "pgd" for s in rows.values())
    assert rows["pgd10"].step_size == pytest.approx(1.6) and rows["pgd2000"].step_size == 1.0
    rb = get_suite("robustbench", EvalCfg())
    (aa,) = rb.attacks
    assert (aa.attack, aa.eps, aa.norm, aa.targeted, rb.robustbench) == ("standard", 4.0, "linf", False, True)
    quick = get_suite("quick", EvalCfg(eps=32.0, step=8.0, targeted=False))
    (q,) = quick.attacks
    assert (q.label, q.eps, q.steps, q.step_size, q.targeted) == ("pgd10", 32.0, 10, 8.0, False)
    assert get_suite("quick", EvalCfg(eps=4, targeted=True), ["eval.eps"]).attacks[0].eps == 4
    full = get_suite("full", EvalCfg(eps=16.0, step=1.0, targeted=True))
    kinds = {s.kind for s in full.attacks}
    assert kinds == {"white-box", "black-box"}
    assert {s.steps for s in full.attacks if s.attack == "pgd" and s.eps == 16 and s.restarts == 1
            and s.targeted} == {1, 10, 100, 1000}
    assert any(s.restarts > 1 for s in full.attacks) and any(s.eps >= 255 and not s.random_start
                                                             for s in full.attacks)
    assert len({s.eps for s in full.attacks if s.attack == "pgd" and s.eps < 255}) >= 3
    assert set(full.aggregates["worst-case"]) >= {"autoattack", "square", "pgd1000t"}
    for suite in (fd, rb, quick, full):  # every row builds with the attack library's make_attack
        for s in suite.attacks:
            atk = build_attack(s, seed=3)
            assert atk.eps == pytest.approx(min(s.eps, 255) / 255) and atk.targeted == s.targeted

    with pytest.raises(ConfigError, match="fixes its budget"):
        get_suite("fd", EvalCfg(eps=8), ["eval.eps"])
    with pytest.raises(ConfigError, match="unknown suite"):
        get_suite("autoatack", EvalCfg())
    with pytest.raises(ConfigError, match="unknown: \\['iters'\\]"):
        suite_from_dict({"attacks": [{"label": "x", "attack": "pgd", "iters": 3}]})
    with pytest.raises(ConfigError, match="unknown attack 'pgdd'"):
        AttackSpec("x", "pgdd", eps=8, steps=3)
    with pytest.raises(ConfigError, match="0..255 pixel units"):
        AttackSpec("x", "pgd", eps=300, steps=3)
    with pytest.raises(ConfigError, match="aggregate"):
        suite_from_dict({"attacks": [{"label": "a", "eps": 8, "steps": 1}], "aggregates": {"w": ["a", "b"]}})


SUITE = {"name": "tiny", "robustbench": True, "attacks": [
    {"label": "pgd1", "attack": "pgd", "eps": 16, "steps": 1},
    {"label": "pgd10", "attack": "pgd", "eps": 16, "steps": 10, "step": 4},  # far ahead of pgd1: never flat
    {"label": "pgd4-eps4", "attack": "pgd", "eps": 4, "steps": 4},
    {"label": "pgd2t", "attack": "pgd", "eps": 16, "steps": 2, "targeted": True},
    {"label": "unbounded", "attack": "pgd", "eps": 255, "steps": 8, "random_start": False},
    {"label": "autoattack", "attack": "standard", "eps": 4, "steps": 3,
     "kwargs": {"square_queries": 10, "n_target_classes": 2}}],
    "aggregates": {"worst-eps16": ["pgd1", "pgd10", "pgd2t"]}}


def test_cli_suite_writes_consistent_reports(trained_digits_model, tmp_path: Path, capfd) -> None:
    from atscale.cli import main as cli

    _, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    spec = tmp_path / "tiny.yaml"  # + a transfer row crafted on a second copy of the same model: same numbers
    spec.write_text(yaml.safe_dump({**SUITE, "attacks": SUITE["attacks"] + [
        {"label": "pgd10-transfer", "attack": "pgd", "eps": 16, "steps": 10, "step": 4, "source": str(ckpt)}]}))
    out = tmp_path / "ev"
    assert cli(["eval", str(ckpt), "--suite", str(spec), "--max-images", "50", "--out", str(out),
                "--no-progress"]) == 0
    doc = json.loads((out / "eval.json").read_text())
    r = doc["results"]
    assert list(r) == ["clean", "pgd1", "pgd10", "pgd4-eps4", "pgd2t", "unbounded", "autoattack", "pgd10-transfer",
                       "worst-eps16"]
    assert r["pgd10-transfer"]["kind"] == "transfer" and r["pgd10-transfer"]["acc"] == r["pgd10"]["acc"]
    assert doc["n"] == 50 and all(v["n"] == 50 for v in r.values()) and doc["world_size"] == 1
    clean = r["clean"]["acc"]
    assert clean > 0.8
    for k, v in r.items():
        assert 0 <= v["acc"] <= clean, k
        assert v["acc"] * 50 == pytest.approx(round(v["acc"] * 50)), k  # whole images
    assert r["pgd10"]["acc"] <= r["pgd1"]["acc"] and r["pgd10"]["acc"] <= r["pgd4-eps4"]["acc"]
    assert r["unbounded"]["acc"] == 0
    assert r["worst-eps16"]["acc"] <= min(r[m]["acc"] for m in ("pgd1", "pgd10", "pgd2t"))
    assert (r["pgd10"]["step"], r["pgd10"]["steps"]) == (pytest.approx(4.0), 10)
    assert r["pgd2t"]["targeted"] and 0 <= r["pgd2t"]["success_rate"] <= 1
    assert (r["autoattack"]["kind"], r["autoattack"]["eps"]) == ("white-box", 4.0)
    assert doc["flags"] == [] and doc["probes"]["gradients"]["n"] == 50

    rb = json.loads((out / "robustbench_model_info.json").read_text())
    assert rb["clean_acc"] == f"{100 * clean:.2f}" and rb["autoattack_acc"] == f"{100 * r['autoattack']['acc']:.2f}"
    assert (rb["eps"], rb["threat_model"], rb["dataset"], rb["architecture"]) == ("4/255", "Linf", "digits",
                                                                                  "ResNet-18")
    assert rb["additional_data"] is False and rb["number_forward_passes"] == 1 and rb["unreliable"] is False
    md = (out / "eval.md").read_text()
    assert f"| pgd10 | pgd | white-box | linf | 16/255 | 10 | 4/255 | 1 | False | {100 * r['pgd10']['acc']:.2f}% |" in md
    assert "No flags" in md and "![accuracy_vs_eps](accuracy_vs_eps.png)" in md and "AutoAttack" in md
    for png in ("accuracy_vs_iterations.png", "accuracy_vs_eps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 5000
    assert "| unbounded | pgd |" in capfd.readouterr().out

    # a named suite through the positional form, default output folder under the run
    assert cli(["eval", str(ckpt), "--suite", "quick", "--max-images", "20", "--no-progress"]) == 0
    quick = json.loads((cfg.run_dir / "eval" / "quick" / "eval.json").read_text())
    assert list(quick["results"]) == ["clean", "pgd10"] and quick["results"]["pgd10"]["eps"] == cfg.eval.eps
    assert not (cfg.run_dir / "eval" / "quick" / "robustbench_model_info.json").exists()

    capfd.readouterr()
    assert cli(["eval", str(ckpt), "--suite", "fd", "--eps", "8"]) == 2
    assert "fixes its budget" in capfd.readouterr().err
    assert cli(["eval", str(ckpt), "--suite", "quick", "--attacks", "pgd3"]) == 2
    assert cli(["eval", "--suite", "quick"]) == 2
    assert "no checkpoint given" in capfd.readouterr().err


def test_two_ranks_count_every_image_once(trained_digits_model, tmp_path: Path) -> None:
    """359 val images on 2 gloo ranks (shards of 180 and 179) and a 41-image shift set: the same counts as one
    process (the shift set's .beton is written once, by rank 0, and read by both)."""
    from atscale.evaluate import evaluate_checkpoint

    _, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    spec = tmp_path / "det.yaml"  # deterministic rows: clean start, untargeted
    spec.write_text(yaml.safe_dump({"attacks": [
        {"label": "pgd2", "attack": "pgd", "eps": 16, "steps": 2, "random_start": False}]}))
    from PIL import Image

    from atscale.data.sources import digits_splits

    _, val, classes = digits_splits(32, 0.2, 0)
    for i in range(41):  # a shift test set too: 21 + 20 images on the two ranks
        img, y = val[i]
        (tmp_path / "set" / classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "set" / classes[y] / f"{i}.png")
    shift = ["--shift-root", str(tmp_path / "set"), "--shift-layout", "folder"]  # .beton cache: <out>/shift_cache
    one = evaluate_checkpoint(ckpt, [f"eval.suite={spec}", "eval.max_images=0", f"eval.out={tmp_path / 'one'}",
                                     "log.progress=false", f"eval.shift.roots=[{tmp_path / 'set'}]",
                                     "eval.shift.layouts=[folder]"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "atscale.evaluate", str(ckpt), "--suite", str(spec), "--max-images", "0",
                           "--out", str(tmp_path / "two"), "--no-progress", *shift], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert one["n"] == two["n"] == 359 and two["world_size"] == 2 and one["world_size"] == 1
    assert two["results"]["clean"]["acc"] == one["results"]["clean"]["acc"]
    assert abs(two["results"]["pgd2"]["acc"] - one["results"]["pgd2"]["acc"]) <= 1 / 359
    assert two["probes"]["gradients"]["n"] == 359  # each rank probed its own first batch, summed
    assert two["shift"][0]["n"] == one["shift"][0]["n"] == 41
    assert two["shift"][0]["correct"] == one["shift"][0]["correct"] > 30
    assert len(list((tmp_path / "two" / "shift_cache").glob("*.beton"))) == 1
