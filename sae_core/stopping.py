"""A stop asked for from outside (Ctrl-C, SIGTERM), honoured between units of work.

The entry points' signal handlers `request` a stop; the long loops (a forward pass's decoder
blocks, extraction's forward batches and shards, training's steps, evaluation's batches,
tokenization's chunks) and the pipeline between stages call `check`,
which raises `StopRequested` once one was requested. So a stop never lands inside a store write
or a checkpoint: what was committed stays committed, and a re-run resumes from it. A leaf: it
imports nothing of saeflow, and nothing here touches signals itself.
"""

from __future__ import annotations

import signal
import threading

_requested: list[int] = []  # the signal that asked, once one has
_lock = threading.Lock()


class StopRequested(BaseException):
    """A stop the user asked for: not an error, so, like KeyboardInterrupt, no `except
    Exception` (a retry loop, a task's retry policy) takes it for one and carries on."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def request(signum: int) -> bool:
    """Ask every `check` from now on to stop; True for the first request, False when one was
    already made."""
    with _lock:
        if _requested:
            return False
        _requested.append(signum)
        return True


def requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _requested[0] if _requested else None


def check() -> None:
    """Raise StopRequested if a stop was requested; otherwise nothing (cheap: call it often)."""
    if _requested:
        raise StopRequested(_requested[0])


def reset() -> None:
    """Forget a request: the next run in this process (a test, a notebook) starts afresh."""
    with _lock:
        _requested.clear()
