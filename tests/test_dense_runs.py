"""Dense runs end to end (issue 15): config sections and presets, training with an exact resume, `atscale dense dag`
(report, perturbation file, PERM, figures), transfer through the same scorer, counted skips and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from atscale.cli import main as cli
from atscale.config.dense import load_dense_config
from atscale.errors import ConfigError, DatasetError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dense"
TINY = ["data.image_size=64", "data.n_train=32", "data.n_val=6", "data.digit_size=[16,28]", "data.batch_size=8",
        "data.eval_batch_size=6", "optim.epochs=1", "run.progress=false", "run.tensorboard=false"]


def _train(tmp: Path, name: str, preset: str = "scenes_lraspp", *extra: str) -> Path:
    rc = cli(["dense", "train", "--config", str(CONFIGS / f"{preset}.yaml"), *TINY, f"run.out_dir={tmp}",
              f"run.name={name}", *extra])
    assert rc == 0
    return tmp / name


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_dense_preset_loads(preset):
    cfg = load_dense_config(CONFIGS / f"{preset}.yaml")
    assert cfg.task == ("detection" if "fasterrcnn" in preset else "segmentation")
    assert cfg.dag.gamma == 0.5 and cfg.dag.iters_for(cfg.task) == (150 if cfg.task == "detection" else 200)


@pytest.mark.parametrize("override, words", [
    ("model.arch=resnet50", "not a dense model"),
    ("data.digit_size=[40,60]", "data.digit_size"),
    ("data.source=voc", "needs data.root"),
    ("model.num_classes=2", "model.num_classes"),
    ("dag.gamma=0", "dag.gamma"),
])
def test_bad_dense_config_names_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_dense_config(CONFIGS / "scenes_lraspp.yaml", [override])


def test_model_with_fewer_classes_than_the_data_is_refused(tmp_path, capsys):
    rc = cli(["dense", "train", "--config", str(CONFIGS / "scenes_lraspp.yaml"), *TINY, f"run.out_dir={tmp_path}",
              "model.num_classes=5"])
    assert rc == 2 and "model.num_classes=11" in capsys.readouterr().err


def test_resumed_training_ends_where_an_unbroken_run_does(tmp_path):
    whole = _train(tmp_path, "whole", "scenes_lraspp", "optim.epochs=2", "data.flip=true")
    split = tmp_path / "split"  # the same run, killed after its first epoch's checkpoint
    shutil.copytree(whole, split)
    ckpts = split / "checkpoints"
    (ckpts / "step_00000008.pt").unlink()
    shutil.copy(ckpts / "step_00000004.pt", ckpts / "last.pt")
    (split / "summary.json").unlink()
    _train(tmp_path, "split", "scenes_lraspp", "optim.epochs=2", "data.flip=true")
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 8 and json.loads((split / "summary.json").read_text())["resumed"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    logged = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if r["kind"] == "epoch"] == [1, 2]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in logged if r["kind"] == "epoch")


def test_dag_command_writes_its_report_and_transfer_scores_the_same_field(tmp_path, capsys):
    run = _train(tmp_path, "seg")
    assert cli(["dense", "dag", str(run), "dag.max_iters=3", "dag.images=4", "dag.perm_draws=2", "--no-progress"]) == 0
    rep = json.loads((run / "dag" / "dag.json").read_text())
    assert rep["images"] == 4 and len(rep["perm_draws"]) == 2 and rep["max_iters"] == 3
    assert len(rep["active_curve"]) >= 1 and rep["targets_mean"] > 0
    for f in ("dag.md", "examples.png", "active.png", "perturbations.pt"):
        assert (run / "dag" / f).is_file(), f
    pert = torch.load(run / "dag" / "perturbations.pt", weights_only=True)
    assert pert["r"].shape == (4, 3, 64, 64) and float(pert["r"].abs().max()) <= 3 * 0.5 / 255 + 1e-3
    capsys.readouterr()
    assert cli(["dense", "transfer", str(run), "--perturbation", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(rep["dag"], abs=1e-9)
    capsys.readouterr()
    assert cli(["dense", "transfer", str(run), "--images", "4"]) == 0  # no perturbation: the clean metric
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(rep["clean"], abs=1e-9)
    assert cli(["dense", "transfer", str(run), "--perturbation", str(run), "--images", "9"]) == 2
    assert "cover only 4 images" in capsys.readouterr().err
    other = tmp_path / "dag_gamma2"  # another setting beside the first, read back by transfer from its folder
    assert cli(["dense", "dag", str(run), "dag.max_iters=3", "dag.images=4", "dag.perm_draws=0", "dag.gamma=2",
                "--out", str(other), "--no-progress"]) == 0
    assert json.loads((other / "dag.json").read_text())["gamma_255"] == 2
    assert json.loads((run / "dag" / "dag.json").read_text()) == rep
    capsys.readouterr()
    assert cli(["dense", "transfer", str(run), "--perturbation", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(
        json.loads((other / "dag.json").read_text())["dag"], abs=1e-9)


def test_transfer_refuses_perturbations_of_other_images(tmp_path, capsys):
    a = _train(tmp_path, "a")
    b = _train(tmp_path, "b", "scenes_lraspp", "data.val_seed=7")
    assert cli(["dense", "dag", str(a), "dag.max_iters=1", "dag.images=2", "dag.perm_draws=0", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["dense", "transfer", str(b), "--perturbation", str(a)]) == 2
    assert "other val images" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="atscale dense dag"):
        from atscale.dense import load_perturbation

        load_perturbation(tmp_path / "nowhere")


def test_detection_run_attacks_selected_proposals_or_counts_skips(tmp_path):
    run = _train(tmp_path, "det", "scenes_fasterrcnn", "data.batch_size=4", "data.eval_batch_size=3",
                 "model.options.rpn_pre_nms_top_n_test=100", "model.options.rpn_post_nms_top_n_test=50",
                 "dag.proposals=50", "dag.score_min=0.0")
    assert cli(["dense", "dag", str(run), "dag.max_iters=2", "dag.images=3", "dag.perm_draws=1", "--no-progress"]) == 0
    rep = json.loads((run / "dag" / "dag.json").read_text())
    assert rep["metric"] == "map50" and rep["attacked"] + rep["skipped_no_target"] == 3
    assert rep["attacked"] > 0 and rep["targets_mean"] > 0  # score_min 0: every proposal overlapping a digit counts


def test_dense_training_under_torchrun_shards_the_scenes(tmp_path):
    """Two gloo ranks (DDP + DistributedSampler): each epoch takes half the steps of one process on the same scenes."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = CONFIGS.parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "atscale.dense", "train", "--config",
           str(CONFIGS / "scenes_lraspp.yaml"), *TINY, f"run.out_dir={tmp_path}", "run.name=ddp"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 32 // (2 * 8)  # 32 scenes, batch 8 per rank, 2 ranks
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["miou"] >= 0


def test_a_rerun_with_other_settings_does_not_resume_the_old_run(tmp_path, capsys):
    _train(tmp_path, "r")
    rc = cli(["dense", "train", "--config", str(CONFIGS / "scenes_lraspp.yaml"), *TINY, f"run.out_dir={tmp_path}",
              "run.name=r", "optim.lr=0.01"])
    assert rc == 2 and "optim.lr: 0.002 -> 0.01" in capsys.readouterr().err
