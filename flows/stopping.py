"""Ctrl-C and SIGTERM as a stop request (sae_core.stopping), and flows that a stop ends Cancelled.

By default Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be (inside a
store write, or waiting on an extraction thread that carries on) and Prefect turns SIGTERM into
an exception of its own. Here the first SIGINT or SIGTERM only requests a stop: the running
loop ends at its next check (between a forward pass's decoder blocks, training steps, evaluation
batches, stages), what was committed stays, and the flow reports itself Cancelled. Before a
flow's body runs (the configuration, Prefect's server starting) nothing would check, and a
second signal means "now": both raise KeyboardInterrupt at once. The CLI turns either ending
into one line (flows/cli/errors.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sae_core import stopping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
P = ParamSpec("P")
R = TypeVar("R")


_checking: list[None] = []  # one entry per flow body running: the loops that check are ahead


def _on_signal(signum: int, frame: Any) -> None:
    # Outside a flow's body (starting Prefect's server, before the flow) nothing would check.
    if not stopping.request(signum) or not _checking:
        raise KeyboardInterrupt  # a second signal, or no loop to end: now


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM request a stop for as long as the block runs; the previous handlers
    come back after it. Outside the main thread (where Python delivers signals) it does nothing."""
    try:
        previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cancelled_on_stop(body: Callable[P, R]) -> Callable[P, R]:
    """A flow's body that a stop request ends with the flow run Cancelled (and its caller
    raising prefect's CancelledRun) instead of Crashed. The body takes the signals back from
    Prefect, which turns SIGTERM into an exception raised wherever the flow is."""

    @functools.wraps(body)
    def stoppable(*args: P.args, **kwargs: P.kwargs) -> R:
        from prefect.states import Cancelled

        with stop_on_signals():
            _checking.append(None)
            try:
                return body(*args, **kwargs)
            except stopping.StopRequested as stop:
                return Cancelled(message=f"{stop}; a re-run resumes from what was committed")
            finally:
                _checking.pop()

    # Prefect validates the parameters against the annotations, which name types of the body's
    # module (postponed annotations): hand it them resolved.
    stoppable.__signature__ = inspect.signature(body, eval_str=True)  # type: ignore[attr-defined]
    stoppable.__annotations__ = typing.get_type_hints(body)
    return stoppable


class _QuietAfterStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return stopping.requested() is None


_QUIET = _QuietAfterStop()


def quiet_console_after_stop() -> None:
    """From a stop request on (until `stopping.reset`), the log handlers of the root logger
    (Prefect's console) print nothing: the tasks the stop ends report themselves crashed, which
    is no news to the user who asked, and the command says in one line what happened. Prefect's
    API still records it all."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # the handlers to quieten exist from here on
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QUIET)  # once per handler, however often called
