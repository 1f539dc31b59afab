"""Stop requests (preemption, time limit) that the training loop honours at the next step boundary.

A launcher installs ``install_handler(signal.SIGUSR2)`` (or calls ``request_stop()``); the loop then saves a checkpoint
at the next optimizer-step boundary (all ranks agree on that step) and ``train.main`` returns
``{"stopped": True, "reason": "preempted", ...}``. The launcher requeues afterwards. Nothing here imports submitit.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

_stop = threading.Event()


def request_stop(*_: Any) -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear() -> None:
    _stop.clear()


def install_handler(signum: int = signal.SIGUSR2) -> Callable | int | None:
    """Route ``signum`` to ``request_stop``; returns the previous handler so the caller can chain to it later."""
    previous = signal.getsignal(signum)
    signal.signal(signum, request_stop)
    return previous
