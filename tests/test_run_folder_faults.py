"""Nothing lost, nothing stuck: the run folder's lock, resume choice and preflight, leftovers of killed writers, a
full disk, and SIGKILL at random points followed by ``--resume auto`` (ending bit-identical to an unbroken run).

Every run here is a real ``atscale train`` process (``python -m atscale.train``) on the digits fixture."""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atscale.checkpoint import CheckpointError, check_room, load_checkpoint
from atscale.config import load_config
from atscale.reporting.runlog import read_log
from atscale.run_folder import RunFolder
from atscale.train import main
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
FAST = {"run.threads": 2, "run.ckpt_every_steps": 4, "log.every_steps": 1, "data.num_workers": 1}


def train_cmd(root: Path, out: Path, name: str, **extra: object) -> list[str]:
    return [sys.executable, "-m", "atscale.train", *tiny_overrides(root, out, name, **{**FAST, **extra})]


def start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def train_records(run: Path) -> int:
    return sum(r["kind"] == "train" for r in read_log(run / "log.jsonl", redone=True))


def all_checkpoints_load(run: Path) -> None:
    for f in sorted((run / "checkpoints").glob("*.pt")):
        state = load_checkpoint(f)
        assert "model" in state, f


def temporaries(run: Path) -> list[Path]:
    return RunFolder(run).stale_temporaries() + [p for p in run.glob(".export*")]


def test_a_second_process_on_a_run_folder_is_refused_and_a_killed_holder_leaves_no_stuck_lock(
        digits_root: Path, tmp_path: Path) -> None:
    cmd = train_cmd(digits_root, tmp_path, "busy", **{"schedule.epochs": 3})
    first = start(cmd)
    try:
        wait_for(lambda: train_records(tmp_path / "busy") > 0, first)
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another atscale process (pid {first.pid} on" in err and "another run.name" in err
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    lines = (tmp_path / "busy" / "log.jsonl").read_text().splitlines()
    assert sum('"kind": "start"' in ln for ln in lines) == 1  # the refused process wrote nothing
    RunFolder(tmp_path / "busy").lock().release()  # the killed holder's lock went with it


def test_resume_auto_takes_a_step_file_without_last_pt_and_skips_an_unreadable_one(digits_root: Path,
                                                                                   tmp_path: Path, capfd) -> None:
    over = dict(FAST, **{"run.ckpt_every_steps": 1, "run.keep_last": 3})
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "r", **over, **{"run.max_steps": 3})))
    ck = tmp_path / "r" / "checkpoints"
    (ck / "last.pt").unlink()
    (ck / "step_00000003.pt").write_bytes((ck / "step_00000003.pt").read_bytes()[:1000])  # torn by a disk fault
    (ck / ".step_00000004.pt.x1y2.tmp").write_bytes(b"partial")
    (ck / f".last.{2 ** 22 + 7}.tmp").write_bytes(b"partial")
    capfd.readouterr()
    out = main(load_config(None, tiny_overrides(digits_root, tmp_path, "r", **over,
                                                **{"run.max_steps": 4, "run.resume": "auto"})))
    err = capfd.readouterr().err
    assert out["step"] == 4
    assert "skipped unreadable checkpoint(s) step_00000003.pt" in err
    assert f"resumed from {ck / 'step_00000002.pt'}: epoch 0, batch 2, step 2" in err
    assert "removed 2 temporary file(s)" in err and not temporaries(tmp_path / "r")
    resume = [r for r in read_log(tmp_path / "r" / "log.jsonl", redone=True) if r["kind"] == "resume"]
    assert resume[-1]["step"] == 2 and resume[-1]["checkpoint"].endswith("step_00000002.pt")
    redone = [r for r in read_log(tmp_path / "r" / "log.jsonl", redone=True) if r.get("redone")]
    assert {r["step"] for r in redone if r["kind"] == "train"} == {3}
    assert [r["step"] for r in read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_auto_with_nothing_to_resume_says_so(digits_root: Path, tmp_path: Path, capfd) -> None:
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "typo", **FAST,
                                          **{"run.max_steps": 1, "run.resume": "auto"})))
    assert "run.resume=auto found no checkpoint in" in capfd.readouterr().err


def test_a_truncated_checkpoint_is_refused_before_any_set_up(digits_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = subprocess.run(train_cmd(digits_root, tmp_path, "new", **{"run.resume": str(bad)}), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "cannot be read safely" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_room_is_checked_before_a_checkpoint_is_written(tmp_path: Path) -> None:
    import shutil

    with pytest.raises(CheckpointError, match="not enough disk space .* lower run.keep_last"):
        check_room(tmp_path, shutil.disk_usage(tmp_path).free + 2 ** 30)
    check_room(tmp_path, 1024)


def test_a_failing_checkpoint_write_is_a_clear_error_and_the_previous_checkpoint_stays(digits_root: Path,
                                                                                       tmp_path: Path) -> None:
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "full", **FAST, **{"run.max_steps": 2})))
    ck = tmp_path / "full" / "checkpoints" / "step_00000002.pt"
    limit = ck.stat().st_size // 2

    def small_files() -> None:  # the process may not write any file larger than half a checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(train_cmd(digits_root, tmp_path, "full", **{"run.max_steps": 4, "run.resume": "auto"}),
                         cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert "writing checkpoint" in line and "failed: File too large" in line and "--resume auto" in line
    assert load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["step"] == 2
    all_checkpoints_load(tmp_path / "full")
    assert not temporaries(tmp_path / "full")


def _run_with_kills(root: Path, out: Path, kills: int, seed: int, extra: dict) -> tuple[Path, list[str]]:
    """Start, SIGKILL at a random point, resume with --resume auto, ... then resume until the run ends."""
    run, rng, events = out / "killed", random.Random(seed), []
    for i in range(kills + 1):
        cmd = train_cmd(root, out, "killed", **extra, **({"run.resume": "auto"} if i else {}))
        proc = start(cmd)
        if i == kills:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            return run, events
        target = train_records(run) + (rng.randint(1, 12) if kills > 1 else rng.randint(5, 8))
        try:
            wait_for(lambda: train_records(run) >= target or (run / "eval.json").exists(), proc)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill()
            proc.wait()
        stage = "export/report" if (run / "eval.json").exists() else "training/final eval"
        events.append(f"kill {i + 1}: {train_records(run)} train records, {stage}, "
                      f"{len(list((run / 'checkpoints').glob('step_*.pt')))} step files")
        all_checkpoints_load(run)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("kills", [pytest.param(1, id="short"), pytest.param(8, id="long", marks=pytest.mark.slow)])
def test_sigkill_at_random_points_then_resume_ends_bit_identical(digits_root: Path, tmp_path: Path,
                                                                 kills: int) -> None:
    extra = {"schedule.epochs": 2 if kills > 2 else 1, "run.export": True}
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "ref", **FAST, **extra)))
    run, events = _run_with_kills(digits_root, tmp_path, kills, seed=kills, extra=extra)
    print("fault injection:", "; ".join(events))
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (k, events)
    ea, eb = (json.loads((d / "eval.json").read_text())["results"] for d in (tmp_path / "ref", run))
    assert {k: v["acc"] for k, v in ea.items()} == {k: v["acc"] for k, v in eb.items()}
    assert (run / "export" / "model.safetensors").is_file() and (run / "report.md").is_file()
    all_checkpoints_load(run)
    assert not temporaries(run), temporaries(run)
    steps = [r["step"] for r in read_log(run / "log.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "re-done steps must be marked and dropped by read_log"
    assert b["train_images"] == a["train_images"]  # the whole run's images: re-done work counts once
