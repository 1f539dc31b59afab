"""Wall time of ``atscale dense dag`` on one trained run, at two or more commits, in one invocation.

Each ``--refs`` commit is exported (``git archive``) to a temporary folder and runs ``python -m atscale dense dag RUN
dag.images=N --out TMP`` with that tree first on PYTHONPATH, one after the other on the same machine. The record
holds, per commit, the DAG seconds (the attack loop, from ``dag.json``), the mean steps, p and the DAG metric, and the
time ratio of each commit to the first. Equal metrics and p show that a speed change left the attack unchanged.

    python benchmarks/dag_cost.py --run runs/dag_fidelity/D0 --images 8 --refs 7524274 HEAD \\
        --save benchmarks/results/cpu-2core_dag_cost.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from train_step import device_info, emit  # benchmarks/ shares the device record

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("seconds", "iters_mean", "p_mean", "clean", "dag", "perm", "converged", "targets_mean", "attacked")


def run_at(ref: str, run: Path, images: int, overrides: list[str]) -> dict:
    """DAG on ``run`` with the package as it was at commit ``ref``; the kept fields of its ``dag.json``."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "tree", Path(tmp) / "out"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", sha, "atscale"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, "-m", "atscale", "dense", "dag", str(run.resolve()), f"dag.images={images}",
                        *overrides, "--out", str(out)], cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((out / "dag.json").read_text())
    return {"ref": ref, "commit": sha, **{k: report[k] for k in KEPT}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a trained dense run folder (atscale dense train)")
    p.add_argument("--images", type=int, default=8, help="val images attacked")
    p.add_argument("--refs", nargs="+", default=["HEAD"], help="commits to time, the first is the baseline")
    p.add_argument("--save", default=None, help="also write the JSON record here")
    p.add_argument("overrides", nargs="*", help="extra dag.* overrides, e.g. dag.max_iters=50")
    a = p.parse_args()
    rows = [run_at(ref, Path(a.run), a.images, a.overrides) for ref in a.refs]
    for r in rows:
        r["time_ratio_to_first"] = round(r["seconds"] / rows[0]["seconds"], 3)
    emit({"benchmark": "dag_cost", "run": a.run, "images": a.images, "overrides": a.overrides, "rows": rows,
          "device": device_info(torch.device("cpu")), "date": dt.date.today().isoformat()}, a.save)


if __name__ == "__main__":
    main()
