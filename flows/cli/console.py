"""The console every command prints its tables and messages to, and progress bars that keep
log lines off their line."""

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console()


@contextmanager
def bars_above_logs() -> Iterator[None]:
    """Log lines emitted while a tqdm bar is on screen print above it (tqdm.write) instead of
    into the bar's line, in Prefect's console format."""
    from prefect.logging.configuration import ensure_logging_setup
    from tqdm.contrib.logging import logging_redirect_tqdm

    # The redirect swaps the console handlers the root logger has on entry, and Prefect
    # installs its own lazily: configure it first.
    ensure_logging_setup()
    with logging_redirect_tqdm():
        yield
