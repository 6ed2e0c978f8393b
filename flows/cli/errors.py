"""The one way a command fails on bad input: one line `error: ...`, exit code 2, no traceback;
and the one way a run stopped by Ctrl-C or SIGTERM ends: one line, exit code 128 + the signal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.markup import escape

from deployments.access import refused
from flows.cli.console import console
from sae_core import stopping
from sae_core.errors import USER_ERRORS, storage_errors, storage_failure


def _fail(err: BaseException) -> NoReturn:
    # One line, whatever the message holds: several failed fields, or a newline the user typed.
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def one_line_errors(*extra: type[Exception]) -> Iterator[None]:
    """Ends the command with one line and exit code 2 on a user error (USER_ERRORS, or one of
    `extra`: what the command's own calls raise on bad input) or on a storage error that
    outlasted the retries (shown as `storage_failure`) or on a server refusing our credentials
    (`deployments.access.refused`); after a stop request (Ctrl-C, SIGTERM: sae_core.stopping)
    whatever the run raised on its way out ends as the one stop line. Anything else is a bug: it
    keeps its traceback."""
    try:
        yield
    except (*USER_ERRORS, *extra) as err:
        _fail(err)
    # Evaluated only when an exception gets here, so botocore loads only then.
    except storage_errors() as err:
        _fail(storage_failure(err))
    except BaseException as err:
        if (signum := stopping.requested()) is not None:
            _stopped(signum)
        # A server that refused our credentials (a 401 from Prefect or MLflow): one line.
        if not isinstance(err, Exception) or (denied := refused(err)) is None:
            raise
        _fail(denied)


def _stopped(signum: int) -> NoReturn:
    """A run stopped by a signal (sae_core.stopping): whatever it raised on its way out (the
    stop itself, a cancelled flow run, a second Ctrl-C) ends as one line on stderr and the
    exit code a shell expects (128 + the signal: 130 for Ctrl-C)."""
    name = stopping.signal_name(signum)
    typer.echo(
        f"stopped by {name}: what was committed is kept; run the same command again to resume",
        err=True,
    )
    raise typer.Exit(128 + signum)
