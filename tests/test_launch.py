"""launch/: the submitit SLURM launcher (real submitit executors, no mocks) and the torchrun wrapper.

The job tests start real submitit local-executor jobs (a controller process plus task processes that unpickle
``launch.slurm.TrainJob``) on the tiny digits config; the two-rank DDP variant is marked slow (-m slow).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from submitit.helpers import DelayedSubmission

from conftest import tiny_overrides
from launch import slurm

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _wait(predicate, timeout: float, what: str, job=None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    if job is not None:
        job.cancel()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{_logs(job)}" if job else ""))


def _logs(job, tail: int = 4000) -> str:
    """The job's stdout (submitit's own log lines) and stderr (atscale's and TrainJob's lines), all tasks, requeues
    included (the local executor appends to the same files)."""
    out = []
    for p in [f for k in range(job.num_tasks) for f in (job.task(k).paths.stdout, job.task(k).paths.stderr)]:
        if Path(p).exists():
            out.append(f"--- {p}\n{Path(p).read_text()[-tail:] if tail else Path(p).read_text()}")
    return "\n".join(out)


def _task_pids(controller_pid: int) -> list[int]:
    """The task processes (python -m submitit.core._submit) started by a local-executor controller."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == controller_pid and "submitit.core._submit" in cmd:
            pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def _cancel_on_failure(job):
    """A failed assertion must not leave the job's controller and tasks running after the test."""
    try:
        yield job
    finally:
        if not job.done():
            job.cancel()


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("kind") == "train":
            steps.append(rec["step"])
    return steps


def _local_params(name: str, minutes: int = 10) -> dict:
    args = slurm.parse_args(["--local", "--gpus-per-node", "0", "--time", str(minutes)])
    return slurm.executor_parameters(args, name)


# ---------------------------------------------------------------------------------------------------------------------
# sbatch rendering and arguments (no SLURM needed)


def test_dry_run_sbatch_has_requested_resources_signal_and_requeue(tmp_path, capsys):
    rc = slurm.main(["--config", DEMO, f"run.out_dir={tmp_path / 'runs'}", "run.name=iat", "--nodes", "4",
                     "--gpus-per-node", "8", "--partition", "learnlab", "--time", "01:30:00", "--account", "proj",
                     "--qos", "high", "--constraint", "volta32gb", "--mem", "480G", "--cpus-per-task", "10",
                     "--folder", str(tmp_path / "logs"), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    flags = set(re.findall(r"^#SBATCH (\S+)$", text, flags=re.M))
    for flag in ["--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--time=90", "--partition=learnlab",
                 "--account=proj", "--qos=high", "--constraint=volta32gb", "--mem=480GB", "--cpus-per-task=10",
                 "--job-name=iat", f"--signal=USR2@{slurm.SIGNAL_DELAY_S}", "--requeue", "--open-mode=append"]:
        assert flag in flags, f"{flag} missing from:\n{text}"
    assert re.search(r"^srun .*-m submitit\.core\._submit " + re.escape(str(tmp_path / "logs")) + "$", text, re.M)
    assert "export SUBMITIT_EXECUTOR=slurm" in text
    assert not (tmp_path / "logs").exists() and not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_defaults_and_optional_flags(tmp_path, capsys):
    rc = slurm.main(["--config", DEMO, f"run.out_dir={tmp_path}", "run.name=plain", "--time", "2-00:00:00",
                     "--no-requeue", "--signal-delay", "300", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    flags = set(re.findall(r"^#SBATCH (\S+)$", text, flags=re.M))
    assert {"--nodes=1", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=2880", "--signal=USR2@300",
            "--job-name=plain"} <= flags
    assert not any(f.split("=")[0] in {"--account", "--qos", "--constraint", "--partition", "--requeue", "--mem"}
                   for f in flags)
    assert f"--output={tmp_path / 'plain' / 'submitit'}/%j_0_log.out" in flags  # default folder: run_dir/submitit


def test_time_mem_and_argument_errors(capsys):
    assert [slurm.parse_time(t) for t in ["90", "01:30:00", "45:30", "1-00", "1-02:03", "0:0:1"]] == \
        [90, 90, 46, 1440, 1563, 1]
    assert slurm.parse_mem("480G") == 480 and slurm.parse_mem("512M") == 0.5 and slurm.parse_mem("2") == 2
    for bad in (["--time", "soon"], ["--mem", "lots"], ["--local", "--nodes", "2"], ["--local", "--dry-run"],
                ["train.steps"], ["bogus.key=1", "--dry-run"]):
        assert slurm.main(["--config", DEMO, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("launch.slurm: ") and "Traceback" not in err, err


def test_without_sbatch_the_cli_suggests_local_or_dry_run(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(REPO))  # a PATH with no sbatch on it
    p = subprocess.run([sys.executable, "-m", "launch.slurm", "--config", DEMO, f"run.out_dir={tmp_path}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "sbatch" in p.stderr and "--local" in p.stderr and "--dry-run" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "demo").exists()  # nothing submitted, no log folder


def test_checkpoint_returns_delayed_submission_of_an_equivalent_job(tmp_path):
    job = slurm.TrainJob(DEMO, ["run.name=x", "optim.lr=0.2"], resume=str(tmp_path / "init.pt"), workdir=tmp_path)
    assert job.config_overrides()[-1] == f"run.resume={tmp_path / 'init.pt'}"
    delayed = job.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.args == () and delayed.kwargs == {}
    nxt = delayed.function
    assert isinstance(nxt, slurm.TrainJob) and nxt is not job
    assert (nxt.config, nxt.overrides, nxt.workdir) == (job.config, job.overrides, job.workdir)
    assert nxt.resume == "auto" and nxt.config_overrides()[-1] == "run.resume=auto"
    assert nxt == slurm.TrainJob(DEMO, ["run.name=x", "optim.lr=0.2"], workdir=tmp_path)
    # a run.resume override is this run's starting point only; the requeued run continues from its own last.pt
    first = slurm.TrainJob(DEMO, ["run.resume=/ckpt/init.pt", "run.name=x", "optim.lr=0.2"], workdir=tmp_path)
    assert first.resume == "/ckpt/init.pt" and first.config_overrides() == job.overrides + ["run.resume=/ckpt/init.pt"]
    assert first.checkpoint().function == nxt
    # what submitit does with it on requeue: pickle, load, call
    delayed.dump(tmp_path / "ckpt.pkl")
    assert DelayedSubmission.load(tmp_path / "ckpt.pkl").function == nxt


def test_torchrun_wrapper_builds_the_torchrun_command():
    script = str(REPO / "launch" / "torchrun.sh")
    h = subprocess.run(["bash", script, "-h"], capture_output=True, text=True)
    assert h.returncode == 0 and "Usage" in h.stdout
    p = subprocess.run(["bash", script, "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node01:29400",
                        "--node-rank", "1", "--dry-run", "--", "--config", "configs/demo.yaml", "attack.eps=8"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", "node01:29400", "--rdzv-id",
                                os.environ.get("SLURM_JOB_ID", "atscale"), "--node-rank", "1", "-m", "atscale.train",
                                "--config", "configs/demo.yaml", "attack.eps=8"]
    d = subprocess.run(["bash", script, "--dry-run", "--", "--config", "x.yaml"], capture_output=True, text=True,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert "--nnodes 1 --nproc-per-node 1 " in d.stdout and "--rdzv-endpoint 127.0.0.1:29500" in d.stdout
    bad = subprocess.run(["bash", script, "--config", "x.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "after --" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------------
# real local-executor jobs


def test_local_executor_job_trains_and_checkpoints(digits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() prepends the repo; restored after
    out = tmp_path / "runs"
    overrides = tiny_overrides(digits_root, out, "local", **{"run.max_steps": 3, "log.every_steps": 1,
                                                             "data.num_workers": 1, "run.threads": 1})
    job = slurm.submit(slurm.TrainJob(None, overrides, workdir=tmp_path), _local_params("local"),
                       tmp_path / "submitit", local=True)
    assert isinstance(job, submitit.local.local.LocalJob)
    with _cancel_on_failure(job):
        _wait(job.done, 150, "the local job to finish", job, poll=0.5)
    assert job.state == "FINISHED", _logs(job)
    result = job.result()  # raises if the task failed
    assert result["step"] == 3 and result["stopped"] is True, result
    assert (out / "local" / "checkpoints" / "last.pt").is_file()
    logs = _logs(job, tail=0)
    assert "atscale TrainJob:" in logs and "torch.distributed rank 0/1" in logs, logs
    assert "Job completed successfully" in logs and "Requeued" not in logs, logs


def _preempt_and_resume(digits_root: Path, tmp_path: Path, tasks: int, planned: int, **extra) -> None:
    """USR2 to every task (what SLURM's --signal does) -> each rank stops at the same step boundary with a checkpoint
    -> rank 0 requeues (exit 144) -> the local controller restarts the tasks -> they resume from last.pt and reach
    the planned step count."""
    out = tmp_path / "runs"
    overrides = tiny_overrides(digits_root, out, "pre", **{"run.max_steps": planned, "log.every_steps": 1,
                                                           "data.num_workers": 1, "run.threads": 1,
                                                           "run.keep_last": 5, **extra})
    args = slurm.parse_args(["--local", "--gpus-per-node", "0", "--tasks-per-node", str(tasks), "--time", "10"])
    job = slurm.submit(slurm.TrainJob(None, overrides, workdir=tmp_path), slurm.executor_parameters(args, "pre"),
                       tmp_path / "submitit", local=True)
    run_dir = out / "pre"
    with _cancel_on_failure(job):
        _wait(lambda: len(_train_steps(run_dir)) >= 2 or job.done(), 150, "training progress", job)
        assert not job.done(), _logs(job)
        # LocalJob._interrupt() signals the controller, which has no USR2 handler and dies (the task is orphaned
        # and never requeued); SLURM signals the tasks, so do that.
        pids = _task_pids(job._process.pid)
        assert len(pids) == tasks, pids
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        _wait(job.done, 150, "the requeued job to finish", job, poll=0.5)
    assert job.state == "FINISHED", _logs(job)
    results = job.results()
    assert [r["step"] for r in results] == [planned] * tasks, results
    logs = _logs(job, tail=0)
    assert logs.count("Requeued job") == 1 and "Calling checkpoint method" in logs, logs
    stops = re.findall(r"atscale TrainJob: stopped at step (\d+) after SIGUSR2", logs)
    assert len(stops) == tasks and len(set(stops)) == 1, logs  # every rank stopped, at the same step
    stop = int(stops[0])
    assert 0 < stop < planned, logs  # train.main returned reason 'preempted' mid-run
    m = re.search(r"resumed from \S+: epoch \d+, batch \d+, step (\d+)", logs)
    assert m and int(m.group(1)) == stop, logs  # the checkpoint was written at the interruption
    assert (run_dir / "checkpoints" / f"step_{stop:08d}.pt").is_file()
    starts = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None and starts[1]["resumed_from"], starts


def test_preempted_local_job_checkpoints_requeues_and_resumes(digits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() prepends the repo; restored after
    _preempt_and_resume(digits_root, tmp_path, tasks=1, planned=20)


@pytest.mark.slow
def test_preempted_two_task_ddp_local_job_resumes(digits_root, tmp_path, monkeypatch):
    """Two gloo DDP ranks through submitit's local executor (TorchDistributedEnvironment's MASTER_ADDR/PORT, RANK,
    WORLD_SIZE): both ranks stop at the same step, rank 0 requeues, both resume."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    _preempt_and_resume(digits_root, tmp_path, tasks=2, planned=12, **{"data.batch_size": 32})
