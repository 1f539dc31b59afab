"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed over the target.

A process killed while saving leaves the previous checkpoint intact and at most a stray ``*.tmp`` file, never a torn
``.pt``. Checkpoints are plain dicts of state_dicts, tensors, numbers and the config as YAML text, so they load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .pt file written by `atscale train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read safely ({type(e).__name__}: {e}); it is corrupt or not an atscale "
            "checkpoint (atscale checkpoints load with weights_only=True)") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not an atscale checkpoint (no 'model' and 'config' entries)")
    return state


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


class CheckpointDir:
    """``<run>/checkpoints``: ``step_<n>.pt`` files with retention, plus ``last.pt`` pointing at the newest."""

    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``step_<n>.pt`` atomically, point ``last.pt`` at it, and drop old steps (with their ``.ds`` folder of
        DeepSpeed partitions, when there is one)."""
        path = self.root / f"{self.step_name(step)}.pt"
        save_checkpoint(state, path)
        tmp = self.root / f".last.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # last.pt shares the step file's bytes; the rename keeps it atomic
            os.replace(tmp, self.last)
        except OSError:
            tmp.unlink(missing_ok=True)
            atomic_write_bytes(self.last, path.read_bytes())
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(".ds"), ignore_errors=True)
        return path

    def step_files(self) -> list[Path]:
        files = [p for p in self.root.glob("step_*.pt") if _STEP_RE.search(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.search(p.name).group(1)))

    def resolve(self, resume: str) -> Path | None:
        """``auto`` -> last.pt if present (else None); a path -> that path; '' -> None."""
        if not resume:
            return None
        if resume == "auto":
            return self.last if self.last.is_file() else None
        p = Path(resume)
        if not p.is_file():
            raise CheckpointError(f"run.resume = '{resume}' is not a file; use 'auto' or a path to a checkpoint")
        return p
