"""One run folder's layout, its lock and its leftovers: the one place that knows where a run keeps what.

``<out_dir>/<name>/`` holds ``config.yaml``, ``log.jsonl``, ``tb/``, ``checkpoints/`` (``step_<n>.pt``, ``last.pt``,
``best.pt``), ``eval.json`` / ``eval.md`` / plots / ``report.md``, ``eval/<suite>/`` (``atscale eval``) and ``export/``.
A training process holds ``.lock`` (an ``flock``: the kernel drops it when the holder dies, so a killed run never
leaves it stuck) for its whole life; a second process on the same folder is refused. While it holds the lock, every
temporary file in the folder was left by a dead writer, so :meth:`RunFolder.remove_stale_temporaries` may delete them.
Base layer: imports only :mod:`atscale.errors`.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from atscale.errors import RunEnvironmentError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run>/.lock`` with the holder's pid, host and start time inside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunEnvironmentError(
                f"run folder '{self.path.parent}' is in use by another atscale process ({holder})",
                "wait for it to finish or stop it, or give this run another run.name / run.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"


class RunFolder:
    """The paths of one run folder (``cfg.run_dir``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def eval_dir(self, suite: str) -> Path:
        return self.root / "eval" / suite

    def lock(self) -> RunLock:
        """Take the folder's lock (raises :class:`RunEnvironmentError` naming the holder when another process has it)."""
        return RunLock(self.root / LOCK_NAME).acquire()

    def stale_temporaries(self) -> list[Path]:
        """Temporary files of atomic writes (``.<name>.*.tmp``, ``.last.<pid>.tmp``) in the folder and checkpoints/."""
        found: list[Path] = []
        for d in (self.root, self.checkpoints):
            if d.is_dir():
                found += [p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
        return sorted(found)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete :meth:`stale_temporaries` (call only while holding the lock); returns what was removed."""
        removed = self.stale_temporaries()
        for p in removed:
            p.unlink(missing_ok=True)
        return removed


__all__ = ["RunFolder", "RunLock", "LOCK_NAME"]
