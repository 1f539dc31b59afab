"""One error family: every failure caused by a user's config, data, checkpoint or environment is an ``AtscaleError``.

Each message names the problem and the fix in one line; ``atscale`` (the CLI) catches the base class, prints that line
and exits with status 2. Anything else that escapes is a bug in atscale and keeps its traceback. This module imports
nothing, so every layer can raise these.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # full, quota, read-only, file too large


class AtscaleError(Exception):
    """Base class: ``AtscaleError(problem, fix)``; ``str(err)`` is one line, "<problem>; <fix>" when a fix is given
    separately (most messages carry it inline)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem, self.fix = problem, fix
        text = f"{problem.rstrip('. ')}; {fix}" if fix else problem
        super().__init__(" ".join(text.split()))


class ConfigError(AtscaleError, ValueError):
    """A configuration value, key, command-line option or suite file is invalid."""


class DatasetError(AtscaleError, RuntimeError):
    """A dataset folder, split or image set is missing, empty or does not match the model."""


class CheckpointError(AtscaleError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model or run it is loaded into."""


class ModelError(AtscaleError, ValueError):
    """The requested architecture or its arguments are not usable."""


class RunEnvironmentError(AtscaleError, RuntimeError):
    """The machine or the distributed world cannot run what the config asks (no CUDA, no process group, ...)."""


class TrainingDiverged(AtscaleError, RuntimeError):
    """The training loss or the weights stopped being finite: the run stops before saving them."""


def run_command(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a command's body: an :class:`AtscaleError` prints one line, ``<prog>: error: <message>``, and gives exit
    status 2, and so does a full disk, quota or read-only filesystem; a Ctrl-C gives 130 without a traceback.
    Anything else propagates (a bug keeps its traceback)."""
    try:
        return int(fn() or 0)
    except AtscaleError as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        print(f"{prog}: error: {err.strerror} (errno {err.errno}) writing '{err.filename or '?'}'; free space or "
              "fix the folder's permissions, then run again (a training run continues from its last checkpoint "
              "with --resume auto)", file=sys.stderr)
        return 2


__all__ = ["run_command", "STORAGE_ERRNOS", "AtscaleError", "ConfigError", "DatasetError", "CheckpointError", "ModelError", "RunEnvironmentError",
           "TrainingDiverged"]
