"""Run logs: one JSON object per line in ``log.jsonl`` and the same scalars in TensorBoard."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_mid_line(self.path)
        self._f = self.path.open("a", buffering=1)
        if torn:  # a process killed mid-line: end that line so this run's records stay one per line
            self._f.write("\n")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _parse(line: str) -> dict | None:
    """One record; None for a blank line or the torn last line of a process killed mid-write."""
    try:
        rec = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_log(path: str | Path, redone: bool = False) -> list[dict]:
    """The records of ``log.jsonl`` in order. A ``start`` record at step S (a process starting, or continuing from a
    checkpoint at S) marks every earlier record with a step after S as work that was re-done or discarded (a process
    stopped or killed after its last checkpoint, or a run restarted without one); those are dropped unless
    ``redone`` (then they carry ``"redone": true``)."""
    p = Path(path)
    recs = [r for r in map(_parse, p.read_text().splitlines()) if r is not None] if p.is_file() else []
    for i, rec in enumerate(recs):
        if rec.get("kind") == "start":
            cut = rec.get("step", 0)
            for earlier in recs[:i]:
                if earlier.get("step", 0) > cut:
                    earlier["redone"] = True
    return recs if redone else [r for r in recs if not r.get("redone")]
