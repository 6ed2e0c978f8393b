"""The temporary Prefect API of a command run without PREFECT_API_URL, tied to the command's life.

Prefect starts such a server itself on first use (`SubprocessASGIServer`): a child in the
command's process group, so a terminal's Ctrl-C stops it before the flow can report how it
ended, and a SIGKILLed command leaves it running. `start_temporary_api` starts it instead, as
Prefect's own test harness does (registered where Prefect's code looks for it), with two
differences: the server runs in a session of its own, which a terminal's signals do not reach,
and a watchdog thread in it stops it once the command that started it is gone, however that
command ended. The command itself stops it at exit, as Prefect does, after its logs are sent.

usage (by `start_temporary_api`): python -m deployments.temporary_api PARENT_PID PORT
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

_WATCH_SECONDS = 0.2
_SHUTDOWN_SECONDS = 10.0  # after the parent is gone: a graceful stop, then a hard one


def start_temporary_api() -> None:
    """Without a Prefect API configured (PREFECT_API_URL) and where Prefect may start a
    temporary one, start it now, tied to this process; otherwise nothing. Prefect stops it at
    exit."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return
    # Prefect's server module takes seconds to import: only when a server starts.
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server (port choice, health wait, stop at exit), launched
        through this module's `main`."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            from prefect.settings import get_current_settings

            settings = get_current_settings().to_environment_variables(exclude_unset=True)
            return subprocess.Popen(
                [sys.executable, "-m", __name__, str(os.getpid()), str(self.port)],
                env={**os.environ, **settings},
                start_new_session=True,
            )

    TiedServer().start()


def create_app() -> Any:
    """The API alone (Prefect's ephemeral mode: no UI, no background services)."""
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app(ephemeral=True, final=True)


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(_SHUTDOWN_SECONDS)
    os._exit(1)


def main(parent: int, port: int) -> None:
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    import uvicorn

    # Exits with code 3 when the port is taken: Prefect's start picks another one.
    uvicorn.run(
        "deployments.temporary_api:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
