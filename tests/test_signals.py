"""`atscale train` turns SIGTERM (SLURM's time limit, torchrun on a peer's failure), SIGUSR1, SIGUSR2 and SIGINT into a
stop at the next optimizer step with a checkpoint, says so, and exits with 128 + the signal's number; `--resume auto`
continues the run to its end. A second Ctrl-C aborts at once (exit 130, one line)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atscale.checkpoint import load_checkpoint
from atscale.cli import main as cli
from atscale.training import preempt
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# 1438 training images at batch 32: 44 steps, so the run is still training when the signal comes after step 1
FAST = {"data.batch_size": 32, "data.num_workers": 1, "attack.iters": 1, "log.every_steps": 1, "eval.steps": [1],
        "eval.max_images": 64, "run.threads": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r for r in rows if r["kind"] == kind]


def _signal_when_training(proc: subprocess.Popen, run_dir: Path, signum: int, out: Path) -> str:
    """Wait for the first train record, send ``signum`` to ``proc``, wait for its end; returns its output."""
    deadline = time.monotonic() + 240
    while not _records(run_dir, "train"):
        assert proc.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return out.read_text()


def _stopped_step(text: str, name: str) -> int:
    found = re.findall(rf"stopped at step (\d+) \((?:{name}|preempted)\); checkpoint \S+; continue with --resume "
                       r"auto", text)
    assert len(found) == 1, text[-3000:]
    return int(found[0])


def _check_stop(run_dir: Path, step: int) -> None:
    assert 1 <= step < 44
    assert [r["step"] for r in _records(run_dir, "stopped")] == [step]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step
    assert not _records(run_dir, "eval")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT], ids=lambda s: s.name)
def test_each_stop_signal_requests_a_stop_named_after_it(sig: signal.Signals) -> None:
    """The handlers ``atscale train`` installs (a real signal to this process); the end-to-end stop of each signal is
    below (SIGUSR1, SIGUSR2 and SIGINT behind the slow marker: the same handler as SIGTERM; the second-Ctrl-C test
    runs SIGINT through the command by default)."""
    preempt.clear()
    try:
        with preempt.stop_on_signals("atscale train"):
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
            assert preempt.stop_requested() and preempt.stop_reason() == sig.name
    finally:
        preempt.clear()


@pytest.mark.parametrize("sig", [signal.SIGTERM] + [pytest.param(s, marks=pytest.mark.slow)
                                                     for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)],
                         ids=lambda s: s.name)
def test_signal_stops_at_a_step_with_a_checkpoint_and_resume_finishes(sig: signal.Signals, digits_root: Path,
                                                                       tmp_path: Path) -> None:
    over = tiny_overrides(digits_root, tmp_path, "sig", **FAST)
    run_dir, out = tmp_path / "sig", tmp_path / "train.err"
    with out.open("w") as f, (tmp_path / "train.out").open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "atscale", "train", *over], cwd=tmp_path, env=ENV,
                                stdout=stdout, stderr=f)
        try:
            text = _signal_when_training(proc, run_dir, sig, out)
        finally:
            proc.kill()
    assert proc.returncode == 128 + sig, text[-3000:]
    assert f"atscale train: {sig.name}: stopping at the next step with a checkpoint" in text
    assert "Traceback" not in text, text[-3000:]
    step = _stopped_step(text, sig.name)
    _check_stop(run_dir, step)

    handlers = {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS}
    assert cli(["train", *over, "--resume", "auto"]) == 0
    assert [r["resumed_from"] is not None for r in _records(run_dir, "start")] == [False, True]
    assert _records(run_dir, "eval") and load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 44
    assert preempt.stop_signal() is None and {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS} == handlers


def test_second_sigint_aborts_and_handlers_come_back() -> None:
    """In the block the first SIGINT requests a stop (reason SIGINT), a repeat within SIGINT_REPEAT_S is the same
    Ctrl-C, a later one raises KeyboardInterrupt; afterwards the previous handlers are back."""
    before = {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS}
    preempt.clear()
    try:
        with preempt.stop_on_signals("atscale train"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert preempt.stop_requested() and preempt.stop_reason() == "SIGINT"
            assert preempt.stop_signal() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGTERM)  # a later signal changes nothing
            os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the terminal's Ctrl-C
            time.sleep(0.01)
            assert preempt.stop_reason() == "SIGINT"
            time.sleep(preempt.SIGINT_REPEAT_S + 0.05)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        preempt.clear()
    assert {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS} == before
    preempt.request_stop()
    assert preempt.stop_reason() == "preempted" and preempt.stop_signal() is None
    preempt.clear()
    assert not preempt.stop_requested()


def test_second_ctrl_c_on_the_command_is_one_line_exit_130(digits_root: Path, tmp_path: Path) -> None:
    """Steps of ~1 s (PGD-30 on a wider net): the second Ctrl-C comes before the stop, and aborts without a
    checkpoint or a traceback."""
    over = tiny_overrides(digits_root, tmp_path, "int2", **{**FAST, "attack.iters": 30, "schedule.epochs": 5,
                                                             "model.kwargs": {"channels": [32, 64, 128, 256]}})
    out = tmp_path / "train.err"
    with out.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "atscale", "train", *over], cwd=tmp_path, env=ENV,
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not _records(tmp_path / "int2", "train"):
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            while "stopping at the next step" not in out.read_text():
                assert proc.poll() is None, out.read_text()[-3000:]
                time.sleep(0.01)
            time.sleep(preempt.SIGINT_REPEAT_S + 0.1)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    text = out.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert proc.returncode == 130 and lines[-1] == "atscale train: interrupted", lines
    assert "Traceback" not in text and "stopped at step" not in text, text[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(digits_root: Path, tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers (and SIGKILLs them 30 s later): both ranks agree on the stop step,
    rank 0 writes the checkpoint and says so, and no worker needed the SIGKILL."""
    over = tiny_overrides(digits_root, tmp_path, "ddp", **{**FAST, "data.batch_size": 16})
    run_dir, out = tmp_path / "ddp", tmp_path / "torchrun.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=atscale-signals",
             "-m", "atscale.train", *over], cwd=tmp_path, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        try:
            text = _signal_when_training(proc, run_dir, signal.SIGTERM, out)
        finally:
            proc.kill()
    assert _records(run_dir, "start")[0]["world_size"] == 2
    step = _stopped_step(text, "SIGTERM")
    _check_stop(run_dir, step)
    assert "forcefully exiting via SIGKILL" not in text and "Unable to shutdown process" not in text, text[-3000:]

