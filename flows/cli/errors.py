"""The one way a command fails on bad input: one line `error: ...`, exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.markup import escape

from deployments.access import refused
from flows.cli.console import console
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
    (`deployments.access.refused`). Anything else is a bug: it keeps its traceback."""
    try:
        yield
    except (*USER_ERRORS, *extra) as err:
        _fail(err)
    # Evaluated only when an exception gets here, so botocore loads only then.
    except storage_errors() as err:
        _fail(storage_failure(err))
    except Exception as err:
        # A server that refused our credentials (a 401 from Prefect or MLflow): one line.
        if (denied := refused(err)) is None:
            raise
        _fail(denied)
