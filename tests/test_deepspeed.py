"""dist.engine=deepspeed on real DeepSpeed engines (CPU accelerator, gloo): ZeRO-1 on 2 processes reaches the weights of
one plain process and resumes from its own partitioned checkpoint; ZeRO-2 trains with PGD in the loop; the checkpoint
feeds eval and export, and resuming it with the other engine fails with a clear message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atscale.errors import CheckpointError
from atscale.checkpoint import load_checkpoint
from atscale.config import load_config
from atscale.checkpoint import model_from_checkpoint
from atscale.train import main
from conftest import tiny_overrides
from test_distributed import CLEAN, EQUIV, GN, REPO, _assert_same, _torchrun, _weights

pytest.importorskip("deepspeed")


def _run_single(overrides: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "atscale.train", *overrides], cwd=REPO, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def test_zero1_two_processes_match_one_process_and_resume(digits_root: Path, tmp_path: Path) -> None:
    """4 steps of one plain process == 2 steps of DeepSpeed ZeRO-1 on 2 ranks, stopped, resumed, 2 more steps."""
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "ref", **GN, **EQUIV, **CLEAN)))
    ds = {**GN, **EQUIV, **CLEAN, "data.batch_size": 32, "dist.engine": "deepspeed", "dist.zero_stage": 1}
    _torchrun(tiny_overrides(digits_root, tmp_path, "ds", **{**ds, "run.max_steps": 2}), nnodes=1, nproc=2)
    ckpts = tmp_path / "ds" / "checkpoints"
    first = load_checkpoint(ckpts / "last.pt")
    assert first["step"] == 2 and first["engine"] == "deepspeed" and first["deepspeed"] == "step_00000002.ds"
    parts = sorted(p.name for p in (ckpts / "step_00000002.ds").iterdir())
    assert parts == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # optimizer state partitioned over the 2 ranks
    _torchrun(tiny_overrides(digits_root, tmp_path, "ds", **{**ds, "run.resume": "auto"}),
              nnodes=1, nproc=2)
    last = load_checkpoint(ckpts / "last.pt")
    assert last["step"] == 4 and (ckpts / "step_00000004.ds").is_dir()
    assert not list(ckpts.glob(".*.tmp"))
    _assert_same(_weights(tmp_path / "ds"), _weights(tmp_path / "ref"))
    start = [json.loads(line) for line in (tmp_path / "ds" / "log.jsonl").read_text().splitlines()
             if '"start"' in line][-1]
    assert start["resumed_from"].endswith("last.pt") and start["global_batch"] == 64


def test_zero2_trains_with_pgd_and_its_checkpoint_evaluates(digits_root: Path, tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "z2", **{**EQUIV, "run.max_steps": 3, "dist.engine": "deepspeed",
                                                          "dist.zero_stage": 2, "run.ckpt_every_steps": 1,
                                                          "run.keep_last": 2, "log.every_steps": 1})
    _run_single(over)
    ckpts = tmp_path / "z2" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002.ds", "step_00000002.pt",
                                                            "step_00000003.ds", "step_00000003.pt"]
    logs = [json.loads(line) for line in (tmp_path / "z2" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r["kind"] == "train"]
    assert len(losses) == 3 and torch.isfinite(torch.tensor(losses)).all()
    model, cfg, _ = model_from_checkpoint(ckpts / "last.pt", torch.device("cpu"))
    assert cfg.dist.engine == "deepspeed"
    init = load_checkpoint(ckpts / "step_00000002.pt")["model"]
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    ddp = over + ["dist.engine=\"ddp\"", "run.resume=\"auto\"", "run.max_steps=4"]
    with pytest.raises(CheckpointError, match="written under another config: dist.engine 'deepspeed' -> 'ddp'"):
        main(load_config(None, ddp))
    with pytest.raises(CheckpointError, match="dist.engine=deepspeed"):  # even when config changes are allowed
        main(load_config(None, ddp + ["run.config_change=\"allow\""]))
