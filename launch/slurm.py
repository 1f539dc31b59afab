"""Submit ``atscale.train`` to SLURM (or the local machine) with submitit; requeue on preemption / time limit.

    python -m launch.slurm --config configs/imagenet/r152_iat.yaml run.name=iat152 \\
        --nodes 16 --gpus-per-node 8 --partition gpu --time 72:00:00 --account proj
    python -m launch.slurm --config configs/demo.yaml --dry-run      # print the sbatch script, submit nothing
    python -m launch.slurm --config configs/demo.yaml --local         # same job through submitit's local executor

One task per GPU. Each task exports the torch.distributed variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE) from submitit's job environment and runs ``atscale.train.main`` with
``run.resume=auto``.

Preemption / time limit: SLURM sends USR2 ``--signal`` seconds before the end (``#SBATCH --signal=USR2@120``).
``TrainJob`` routes that signal to ``atscale.train.request_stop``; the training loop saves a checkpoint at the next
step boundary and ``main`` returns ``{"stopped": True, "reason": "preempted"}``. Only then is submitit's own handler
called: it pickles ``TrainJob.checkpoint()`` (the same job, ``run.resume=auto``) and requeues (``scontrol requeue`` on
SLURM, exit code 144 for the local executor), so the next run continues from ``runs/<name>/checkpoints/last.pt``.

Only ``launch/`` imports submitit; ``atscale`` never does.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import submitit
from submitit.helpers import DelayedSubmission

REPO_ROOT = Path(__file__).resolve().parent.parent
SIGNAL_DELAY_S = 120  # USR2 this many seconds before the time limit; leaves time for one step + a checkpoint


class LaunchError(RuntimeError):
    """A launcher argument or the machine cannot do what was asked; the message says what to do instead."""


# --------------------------------------------------------------------------------------------------------------------
# the job


class TrainJob(submitit.helpers.Checkpointable):
    """One task of a (multi-node) training job: ``atscale.train.main(load_config(config, overrides + [resume]))``.

    ``resume`` is ``run.resume`` for this run: a ``run.resume=...`` override if given (e.g. a checkpoint of another
    run), else ``auto`` (continue from ``last.pt`` if the run folder has one); requeued runs always use ``auto``. ``workdir`` is the submission directory, so relative ``run.out_dir`` and
    ``data.root`` mean the same thing in every task and every requeue.
    """

    def __init__(self, config: str | None, overrides: Sequence[str] = (), resume: str | None = None,
                 workdir: str | None = None) -> None:
        self.config = str(Path(config).resolve()) if config else None
        given = [str(o).split("=", 1)[1] for o in overrides if str(o).replace(" ", "").startswith("run.resume=")]
        self.overrides = [str(o) for o in overrides if not str(o).replace(" ", "").startswith("run.resume=")]
        self.resume = resume if resume is not None else (given[-1] if given else "auto")
        self.workdir = str(Path(workdir).resolve()) if workdir else os.getcwd()

    def __repr__(self) -> str:
        return (f"TrainJob(config={self.config!r}, overrides={self.overrides!r}, resume={self.resume!r}, "
                f"workdir={self.workdir!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainJob) and vars(self) == vars(other)

    def config_overrides(self) -> list[str]:
        """The user's overrides, then ``run.resume`` (last one wins in ``load_config``)."""
        return self.overrides + ([f"run.resume={self.resume}"] if self.resume else [])

    def __call__(self) -> dict[str, Any]:
        from atscale.train import clear_stop, install_stop_handler, load_config, main

        os.chdir(self.workdir)
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        env = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                         overwrite=True)
        print(f"atscale TrainJob: {env}; torch.distributed rank {dist_env.rank}/{dist_env.world_size} "
              f"(local {dist_env.local_rank}/{dist_env.local_world_size}) master "
              f"{dist_env.master_addr}:{dist_env.master_port}", file=sys.stderr, flush=True)
        sig = env._usr_sig()
        clear_stop()
        # submitit installed checkpoint_and_try_requeue for `sig`; defer it until the loop has saved a checkpoint.
        previous = install_stop_handler(sig)
        result = main(load_config(self.config, self.config_overrides()))
        if isinstance(result, dict) and result.get("stopped") and result.get("reason") == "preempted":
            print(f"atscale TrainJob: stopped at step {result.get('step')} after {signal.Signals(sig).name}; "
                  "checkpoint saved, handing over to submitit to requeue", file=sys.stderr, flush=True)
            if callable(previous):
                # rank 0: calls self.checkpoint(), requeues and sys.exit()s; other ranks return and end here.
                previous(sig, None)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The same job with ``run.resume=auto``: the requeued run continues from ``checkpoints/last.pt``."""
        return DelayedSubmission(TrainJob(self.config, self.overrides, resume="auto", workdir=self.workdir))


# --------------------------------------------------------------------------------------------------------------------
# arguments -> executor parameters


def parse_time(text: str | int) -> int:
    """SLURM time formats -> whole minutes (rounded up): 90, 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS'."""
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise LaunchError(f"--time '{text}' is not a SLURM time: use minutes (90), HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is None:
        if b is None:
            seconds = int(a) * 60  # minutes
        elif c is None:
            seconds = int(a) * 60 + int(b)  # minutes:seconds
        else:
            seconds = int(a) * 3600 + int(b) * 60 + int(c)
    else:
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if seconds <= 0:
        raise LaunchError(f"--time '{text}' must be positive")
    return math.ceil(seconds / 60)


def parse_mem(text: str | float) -> float:
    """'64G', '64GB', '500M', '1T' or a number of GB -> GB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise LaunchError(f"--mem '{text}' is not a memory size: use e.g. 64G, 500M or a number of GB")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "": 1.0, "T": 1024.0}[m.group(2).upper()]
    return float(m.group(1)) * scale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Submit atscale training to SLURM with submitit (one task per GPU; USR2 before the time limit "
                    "-> checkpoint at a step boundary -> requeue -> resume from last.pt).")
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.name=iat152 optim.lr=0.2")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node; one task per GPU (default 1)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="default: --gpus-per-node (or 1 without GPUs); set it for CPU-only (gloo) runs")
    p.add_argument("--partition")
    p.add_argument("--time", default="72:00:00", help="minutes or [D-]HH:MM:SS (default 72:00:00)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, e.g. 480G (default: the partition's)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--job-name", help="default: run.name")
    p.add_argument("--folder", help="submitit log folder (default: <run.out_dir>/<run.name>/submitit)")
    p.add_argument("--signal-delay", type=int, default=SIGNAL_DELAY_S,
                   help=f"seconds between USR2 and the time limit (default {SIGNAL_DELAY_S})")
    p.add_argument("--max-timeouts", type=int, default=3,
                   help="how many times a job that hits its time limit is requeued (preemptions are not counted)")
    p.add_argument("--no-requeue", action="store_true", help="leave '#SBATCH --requeue' out")
    p.add_argument("--local", action="store_true", help="run through submitit's local executor (one node)")
    p.add_argument("--no-wait", action="store_true", help="with --local: return after submitting (the job goes on)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script that would be submitted")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise LaunchError(f"unexpected argument(s) {bad}: overrides look like section.key=value")
    if args.nodes < 1:
        raise LaunchError("--nodes must be >= 1")
    if args.gpus_per_node < 0:
        raise LaunchError("--gpus-per-node must be >= 0")
    if args.local and args.dry_run:
        raise LaunchError("--dry-run prints a SLURM script; leave out --local")
    if args.local and args.nodes > 1:
        raise LaunchError(f"--local runs on this machine only: use --nodes 1 (got {args.nodes})")
    return args


def executor_parameters(args: argparse.Namespace, job_name: str) -> dict[str, Any]:
    """AutoExecutor.update_parameters keywords: generic ones plus ``slurm_``-prefixed SLURM-only ones."""
    tasks = args.tasks_per_node if args.tasks_per_node else max(1, args.gpus_per_node)
    params: dict[str, Any] = {
        "name": job_name,
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": parse_time(args.time),
        "mem_gb": parse_mem(args.mem) if args.mem else None,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_additional_parameters": None if args.no_requeue else {"requeue": True},
    }
    return {k: v for k, v in params.items() if v is not None}


def make_executor(folder: str | Path, local: bool, max_timeouts: int = 3) -> submitit.AutoExecutor:
    if not local and shutil.which("sbatch") is None:
        raise LaunchError("no SLURM here: 'sbatch' is not on PATH. Use --local to run the job on this machine "
                          "through submitit's local executor, or --dry-run to print the sbatch script")
    # cluster named explicitly: AutoExecutor's auto-detection would silently fall back to the local executor
    return submitit.AutoExecutor(folder, cluster="local" if local else "slurm", slurm_max_num_timeout=max_timeouts)


def render_sbatch(folder: str | Path, params: dict[str, Any]) -> str:
    """The sbatch script submitit would write for ``params``, without SLURM: AutoExecutor's own parameter
    translation applied to a SlurmExecutor, then ``SlurmExecutor._make_submission_file_text``."""
    from submitit.slurm.slurm import SlurmExecutor

    class _RenderOnly(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # SlurmExecutor refuses to exist where srun is missing; rendering needs no srun
            return 2

    slurm = _RenderOnly(folder)
    auto = types.SimpleNamespace(cluster="slurm", _executor=slurm, _deprecated_args={})
    submitit.AutoExecutor._internal_update_parameters(auto, **params)  # type: ignore[arg-type]
    return slurm._make_submission_file_text(slurm._submitit_command_str, uid="dry-run")


def _importable_env() -> None:
    """Jobs unpickle ``launch.slurm.TrainJob`` and import ``atscale``: put the repo on PYTHONPATH (inherited by the
    local executor's tasks and by sbatch's default ``--export=ALL``)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *parts])


def submit(job: TrainJob, params: dict[str, Any], folder: str | Path, local: bool = False, max_timeouts: int = 3):
    executor = make_executor(folder, local, max_timeouts)
    executor.update_parameters(**params)
    _importable_env()
    return executor.submit(job)


def main(argv: Sequence[str] | None = None) -> int:
    from atscale.train import ConfigError, load_config

    try:
        args = parse_args(argv)

        cfg = load_config(args.config, args.overrides)  # fail on bad keys here, not in the queue
        name = args.job_name or cfg.run.name
        folder = Path(args.folder) if args.folder else cfg.run_dir / "submitit"
        params = executor_parameters(args, name)
        if args.dry_run:
            print(render_sbatch(folder, params))
            return 0
        job = submit(TrainJob(args.config, args.overrides), params, folder, args.local, args.max_timeouts)
    except (LaunchError, ConfigError) as e:
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    where = "local executor" if args.local else "SLURM"
    print(f"submitted job {job.job_id} ({where}, {params['nodes']} node(s) x {params['tasks_per_node']} task(s)); "
          f"logs: {Path(folder).resolve()}")
    print(f"run folder: {cfg.run_dir.resolve()}")
    if args.local and not args.no_wait:
        print("waiting for the local job (Ctrl-C cancels it)...", file=sys.stderr)
        try:
            result = job.result()
        except KeyboardInterrupt:
            job.cancel()
            raise
        print(f"job {job.job_id} done: step {result.get('step')}, stopped {result.get('stopped')}")
    return 0


if __name__ == "__main__":
    # run through the importable module so jobs pickle `launch.slurm.TrainJob` by reference, not `__main__.TrainJob`
    from launch.slurm import main as _main

    sys.exit(_main())
