"""Where a flow's mapped tasks (the extraction's shards) run: `--runner local` (this process,
one shard at a time) or `--runner dask://HOST:PORT` (the workers of a running Dask scheduler,
through prefect-dask). Everything else a flow does stays in its own process."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from sae_core.errors import ConfigError

LOCAL = "local"
_FORMS = "expected 'local' or 'dask://HOST:PORT' (a Dask scheduler, e.g. dask://127.0.0.1:8786)"


def local_runner() -> ThreadPoolTaskRunner:
    """One task at a time in this process: a shard's forward pass already uses every core."""
    return ThreadPoolTaskRunner(max_workers=1)


def dask_address(runner: str) -> str | None:
    """The scheduler address `tcp://HOST:PORT` of a `dask://HOST:PORT` runner; None for local."""
    if runner == LOCAL:
        return None
    url = urlsplit(runner)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "dask" or not url.hostname or port is None or url.path or url.query:
        raise ConfigError(f"--runner '{runner}': {_FORMS}")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname  # IPv6
    return f"tcp://{host}:{port}"


def task_runner(runner: str = LOCAL) -> TaskRunner:
    """The task runner `runner` names, once checked: a Dask scheduler must answer at its
    address, and its workers need a Prefect API they can report to (PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    address = dask_address(runner)
    if address is None:
        return local_runner()
    if not PREFECT_API_URL.value():
        raise ConfigError(
            f"--runner {runner}: the Dask workers report to a Prefect API, and this run has only "
            "its own ephemeral one; set PREFECT_API_URL to a Prefect server they can reach "
            '(`prefect server start`, or eval "$(saeflow services env)")'
        )
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as err:
        raise ConfigError(
            f"--runner {runner}: no Dask scheduler answers at {host}:{port} "
            f"({err.strerror or type(err).__name__}); start one (`dask scheduler`) or fix the address"
        ) from None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
