"""Closing an s3fs filesystem's S3 client on the event loop that owns its connections.

s3fs closes a filesystem's client when the filesystem is collected (a `weakref.finalize`). Where
that happens on a thread running an event loop of its own (the `prefect` command runs a retried
flow inside one; every collected `Store` can trigger it), s3fs schedules the close on *that*
loop, while the client's aiohttp connections belong to fsspec's I/O loop: the close fails
("attached to a different loop") in a task nobody awaits, and asyncio prints "Task exception was
never retrieved" with aiobotocore's traceback. `close_on_its_loop` is the finalizer the store
gives its filesystems instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)
WAIT_SECONDS = 1.0  # how long a thread without a loop waits for the close (s3fs waits 0.1 s)


def close_on_its_loop(loop: asyncio.AbstractEventLoop | None, client: Any) -> None:
    """Close `client` (s3fs's client context) on `loop`, the loop its connections belong to.

    Never blocks a running loop: from a thread that runs one (fsspec's own included) the close
    is only scheduled; elsewhere it is awaited for up to WAIT_SECONDS. A failure to close is
    logged at debug level, never left in an unretrieved task."""
    if client is None:
        return
    if loop is None or not loop.is_running():
        from s3fs import S3FileSystem

        S3FileSystem.close_session(loop, client)  # no loop left: s3fs closes the socket itself
        return
    closing = asyncio.run_coroutine_threadsafe(client.__aexit__(None, None, None), loop)
    closing.add_done_callback(_log_failure)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # this thread runs no loop: waiting blocks nothing
        # A failure is logged by _log_failure; a slow close goes on in the background.
        with contextlib.suppress(Exception):
            closing.result(timeout=WAIT_SECONDS)


def _log_failure(closing: concurrent.futures.Future) -> None:
    if not closing.cancelled() and (error := closing.exception()) is not None:
        log.debug("closing an S3 client failed: %r", error)


def use_for(fs: Any) -> Any:
    """`fs` with close_on_its_loop as the finalizer s3fs registers when it connects (s3fs looks
    `close_session` up on the instance then); other filesystems unchanged."""
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.close_session = close_on_its_loop
    return fs
