"""Training end to end on digits with real FFCV and timm: run-folder contents, exact resume, atomic checkpoints,
export to plain timm, and adversarial training beating standard training under PGD."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch

from atscale.checkpoint import CheckpointDir, CheckpointError, load_checkpoint, save_checkpoint
from atscale.config import load_config
from atscale.train import main
from conftest import clearly_greater, tiny_overrides


def test_run_folder_resume_is_exact(digits_root: Path, tmp_path: Path) -> None:
    common = {"schedule.epochs": 2, "run.keep_last": 3, "data.flip": True}  # crops and flips are seeded: exact
    full = main(load_config(None, tiny_overrides(digits_root, tmp_path, "full", **common)))
    assert not full["stopped"] and full["step"] == 2 * (1438 // 64)

    part = main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **common, **{"run.max_steps": 5})))
    assert part == {"stopped": True, "reason": "max_steps", "step": 5, "run_dir": str(tmp_path / "split")}
    ck = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert (ck["epoch"], ck["batch"], ck["step"]) == (0, 5, 5)
    resumed = main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **common,
                                                    **{"run.resume": "auto"})))
    assert resumed["step"] == full["step"]

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for res in (resumed["eval"], full["eval"]):
        for row in res.values():
            row.pop("seconds", None)
    assert resumed["eval"] == full["eval"]

    run = tmp_path / "split"
    for name in ("config.yaml", "log.jsonl", "eval.json", "report.md", "eval.md", "accuracy_vs_iterations.png", "training.png"):
        assert (run / name).is_file(), name
    kinds = [json.loads(line)["kind"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 2 and "stopped" in kinds and kinds[-1] == "eval"
    assert len(list((run / "checkpoints").glob("step_*.pt"))) <= 3


def test_resume_rejects_an_incompatible_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "r", **{"run.max_steps": 1})))
    other = tiny_overrides(digits_root, tmp_path, "r", **{"run.resume": "auto",
                                                            "model.kwargs": {"channels": [8, 16, 32, 32]}})
    before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"written under another config: model.kwargs .*run.config_change=allow"):
        main(load_config(None, other))
    assert (tmp_path / "r" / "config.yaml").read_text() == before  # refused before any set-up
    with pytest.raises(CheckpointError, match="does not fit model 'resnet18'"):
        main(load_config(None, other + ['run.config_change="allow"']))


def test_checkpoints_load_weights_only_and_reject_pickled_code(tmp_path: Path) -> None:
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": "x: 1"}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["model"]["w"], torch.ones(2))
    torch.save({"model": {}, "config": "", "evil": CheckpointDir(tmp_path)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_killed_while_saving_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from atscale.checkpoint import CheckpointDir
        d = CheckpointDir({str(tmp_path)!r}, keep_last=2)
        step = 0
        while True:
            step += 1
            d.save({{"model": {{"w": torch.full((12_000_000,), float(step))}}, "config": "", "step": step}}, step)
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.7)  # let it get well into a later save, then kill it mid-write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    files = list(tmp_path.glob("*.pt"))
    assert (tmp_path / "last.pt") in files
    for f in files:
        state = load_checkpoint(f)
        assert state["model"]["w"].numel() == 12_000_000
        assert bool((state["model"]["w"] == state["step"]).all()), f


def test_export_loads_in_plain_timm_with_identical_logits(trained_digits_model, digits_val_batch,
                                                          tmp_path: Path) -> None:
    from atscale.evaluate import export_checkpoint

    model, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    out = export_checkpoint(ckpt, tmp_path / "exported")
    assert (out / "model.safetensors").is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == "resnet18" and conf["num_classes"] == 10
    assert conf["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and conf["pretrained_cfg"]["input_size"] == [3, 32, 32]

    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x, _ = digits_val_batch
    data_cfg = timm.data.resolve_data_config({}, model=plain)
    mean = torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model(x)
        theirs = plain((x - mean) / std)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (theirs.argmax(1) == ours.argmax(1)).all()


def test_adversarial_training_beats_standard_training_under_pgd(digits_root: Path, tmp_path: Path) -> None:
    """Same data, model, epochs and eval budget (PGD-10, eps 32/255): Madry training must be clearly more robust."""
    common = {"schedule.epochs": 5, "eval.steps": [10], "eval.step": 4, "eval.max_images": 359,
              "attack.iters": 3, "attack.step": 12, "model.kwargs": {"channels": [16, 32, 64, 128]}}
    adv = main(load_config(None, tiny_overrides(digits_root, tmp_path, "adv", **common)))["eval"]
    std = main(load_config(None, tiny_overrides(digits_root, tmp_path, "std", **common, **{
        "objective.name": "clean", "attack.name": "none"})))["eval"]
    assert std["clean"]["acc"] > 0.85
    assert clearly_greater(adv["pgd10"]["acc"], std["pgd10"]["acc"], 359), (adv, std)


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_broken_weights(digits_root: Path, tmp_path: Path,
                                                                               capfd) -> None:
    """lr 1e4 blows the weights up within a few steps: the run stops at the first non-finite loss (fp32: no loss
    scaler could skip it) or at the first checkpoint whose weights or BN statistics overflowed, whichever comes first;
    the CLI names the problem and the fixes, and every checkpoint on disk is still finite."""
    from atscale.cli import main as cli

    over = tiny_overrides(digits_root, tmp_path, "nan", **{"optim.lr": 1e4, "schedule.warmup_epochs": 0,
                                                           "run.ckpt_every_steps": 1, "run.keep_last": 50})
    assert cli(["train", *over]) == 2
    err = capfd.readouterr().err
    # the first non-finite loss, or weights / BN statistics that overflowed before the loss did, at a checkpoint
    assert re.search(r"training diverged: (loss (nan|inf)|\d+ weight or BN-statistics tensors hold NaN)", err), err
    assert "lower optim.lr" in err
    bad_step = int(re.search(r"at step (\d+)", err).group(1))
    saved = sorted((tmp_path / "nan" / "checkpoints").glob("step_*.pt"))
    assert bad_step < 1438 // 64 and [int(p.stem.split("_")[1]) for p in saved] == list(range(1, bad_step))
    for path in saved:
        ck = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), path
    from atscale.training.guards import nonfinite_state  # the guard in front of every checkpoint write

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    assert nonfinite_state(net) == []
    with torch.no_grad():
        net[2].bias.fill_(float("inf"))
        net[1].running_var.fill_(float("nan"))  # statistics can overflow while the weights are still finite
    assert nonfinite_state(net) == ["1.running_var", "2.bias"]
