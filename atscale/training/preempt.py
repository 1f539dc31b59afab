"""Stop requests (preemption, time limit, Ctrl-C) that the training loop honours at the next step boundary.

``atscale train`` routes SIGTERM (SLURM's time limit, torchrun on a peer's failure), SIGUSR1, SIGUSR2 and SIGINT here
with :func:`stop_on_signals` (a second SIGINT aborts at once: KeyboardInterrupt); a launcher installs
``install_handler(signal.SIGUSR2)`` or calls ``request_stop()``. The loop then saves a checkpoint at the next
optimizer-step boundary (all ranks agree on that step) and ``train.main`` returns ``{"stopped": True, "reason": ...}``
with :func:`stop_reason`'s reason: the signal's name, or "preempted" for a launcher's request. The launcher requeues
afterwards. Nothing here imports submitit or torch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, Sequence

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

# a SIGINT this soon after the first stop request is the same Ctrl-C (torchrun forwards the terminal's SIGINT to the
# workers, which got it from the terminal too), not a second one
SIGINT_REPEAT_S = 0.5

_stop = threading.Event()
_signum: int | None = None
_requested_at = 0.0


def request_stop(signum: int | None = None, frame: FrameType | None = None) -> None:
    """Ask the loop to stop at its next step boundary; as a signal handler it records the signal (the first request
    names the reason)."""
    global _signum
    if not _stop.is_set() and isinstance(signum, int):
        _signum = int(signum)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_signal() -> int | None:
    """The number of the signal that requested the stop, or None (no stop, or ``request_stop()`` without one)."""
    return _signum if _stop.is_set() else None


def stop_reason() -> str:
    """Why the run stops: the signal's name (e.g. "SIGTERM"), or "preempted" for ``request_stop()`` without one."""
    signum = stop_signal()
    return signal.Signals(signum).name if signum is not None else "preempted"


def clear() -> None:
    global _signum, _requested_at
    _stop.clear()
    _signum, _requested_at = None, 0.0


def _launcher_stop(signum: int, frame: FrameType | None) -> None:
    request_stop()


def install_handler(signum: int = signal.SIGUSR2) -> Callable | int | None:
    """Route ``signum`` to ``request_stop``; returns the previous handler so the caller can chain to it later. The
    reason stays "preempted" (launch/slurm.py requeues a run that returns that reason)."""
    previous = signal.getsignal(signum)
    signal.signal(signum, _launcher_stop)
    return previous


def _main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _on_signal(prog: str, signum: int, frame: FrameType | None) -> None:
    global _requested_at
    if _stop.is_set():
        if signum == signal.SIGINT and time.monotonic() - _requested_at > SIGINT_REPEAT_S:
            raise KeyboardInterrupt
        return
    request_stop(signum, frame)
    _requested_at = time.monotonic()
    if _main_rank():
        again = "; Ctrl-C again aborts without one" if signum == signal.SIGINT else ""
        note = f"{prog}: {signal.Signals(signum).name}: stopping at the next step with a checkpoint{again}\n"
        with contextlib.suppress(OSError):
            os.write(2, note.encode())  # not print(): the handler may interrupt a write to sys.stderr


@contextlib.contextmanager
def stop_on_signals(prog: str = "atscale train", signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of ``signals`` requests a stop at the next step boundary (a second SIGINT raises
    KeyboardInterrupt); the previous handlers come back afterwards. Call it from the main thread."""
    previous: dict[int, Any] = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, functools.partial(_on_signal, prog))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


__all__ = ["STOP_SIGNALS", "request_stop", "stop_requested", "stop_signal", "stop_reason", "clear", "install_handler",
           "stop_on_signals"]
