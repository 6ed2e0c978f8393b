"""Remote mode: an MLflow tracking server and a Prefect server on loopback, as services.

`saeflow services up` starts them after SeaweedFS (deployments/services.py lists them in that
order); `saeflow services env` prints MLFLOW_TRACKING_URI and PREFECT_API_URL with their
credentials, and the pipeline uses whatever those name. State lives under
`$SAEFLOW_HOME/services/<name>/`:
- mlflow: SQLite backend (`mlflow.db`); artifacts on the SeaweedFS store (s3://BUCKET/mlartifacts),
  served through the tracking server, so clients need no S3 credentials;
- prefect: its PREFECT_HOME (database, settings).
With `services up --db postgres` (remembered in `$SAEFLOW_HOME/services/database` for the next
`up`) both keep their data in the PostgreSQL service instead (deployments/postgres.py), its URL
in the server's environment, never on its command line.
Both are HTTP servers on loopback checked by a health URL (the one path open without
credentials); the shared lifecycle is `_HttpServer`. Every other request needs HTTP basic auth
(MLflow's basic-auth app, Prefect's API auth string) with a password generated once and kept
owner-only in the state folder: other users of the machine reach neither the registry nor,
through MLflow's artifact proxy, the store.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
import urllib.request
from pathlib import Path

from deployments.mlflow_admin import seed_admin
from deployments.postgres import Postgres
from deployments.process import is_running, spawn, terminate
from deployments.seaweedfs import SeaweedFS
from deployments.state import (
    ServiceFolder,
    ServiceStatus,
    private_dir,
    services_home,
    write_private,
)
from sae_core.env import SERVICE_DEFAULTS

USER = "saeflow"  # the one account of each server
DATABASES = ("sqlite", "postgres")  # what the servers keep their data in; SQLite by default


def _database_file(home: Path | None) -> Path:
    return (home or services_home()) / "database"


def chosen_database(home: Path | None = None) -> str:
    """The database the servers use: the last `services up --db`'s, else SQLite."""
    path = _database_file(home)
    return path.read_text().strip() if path.exists() else "sqlite"


def check_database(database: str) -> str:
    if database not in DATABASES:
        raise ValueError(f"--db {database}: choose one of {', '.join(DATABASES)}")
    return database


def choose_database(database: str, home: Path | None = None) -> None:
    """Remember `database` for later `services up`s."""
    check_database(database)
    private_dir(_database_file(home).parent)
    _database_file(home).write_text(database)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class _HttpServer(ServiceFolder):
    """A server process started detached, recorded in server.json, checked by `health_url`."""

    name = ""
    program: tuple[str, ...] = ()  # `python -m` this, e.g. ("prefect", "server", "start")
    default_port = 0

    def __init__(
        self, home: Path | None = None, port: int | None = None, database: str | None = None
    ):
        super().__init__(home)
        self.port = port or self.default_port
        self.database = database or chosen_database(home)
        self.postgres = Postgres(home) if self.database == "postgres" else None

    def command(self) -> list[str]:
        host = ["--host", "127.0.0.1", "--port", str(self.port)]
        return [sys.executable, "-m", *self.program, *host, *self.options()]

    # What each server defines ------------------------------------------------------------------
    def options(self) -> list[str]:
        """Its command-line options after the host and port."""
        return []

    def server_env(self) -> dict[str, str]:
        return {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.endpoint}/health"

    @property
    def marker(self) -> str:
        """Text in the server's command line: a recorded pid reused by another process is not it."""
        return str(self.dir)

    def secret(self, name: str, reveal: bool = True) -> str:
        """A password generated on first use and kept (0600) in the state folder, so clients set
        up once keep working across restarts; unless `reveal`, a `$(cat FILE)` reading it."""
        path = self.dir / name
        if not path.exists():
            private_dir(self.dir)
            write_private(path, secrets.token_hex(16))
        return path.read_text().strip() if reveal else f"$(cat {shlex.quote(str(path))})"

    # Lifecycle ---------------------------------------------------------------------------------
    @property
    def _log(self) -> Path:
        return self.dir / "server.log"

    def _pid(self) -> int | None:
        if (record := self.record()) is None:
            return None
        pid = record["pid"]
        return pid if is_running(pid, marker=self.marker) else None

    def status(self) -> ServiceStatus:
        pid = self._pid()
        return ServiceStatus(
            self.name,
            running=pid is not None,
            serving=pid is not None and _answers(self.health_url),
            pid=pid,
            endpoint=self.endpoint,
            state_dir=str(self.dir),
            detail=f"data in {self._running_on() if pid else self.database}; log {self._log}",
        )

    def _running_on(self) -> str:
        """The database the recorded server was started with (records before --db: SQLite)."""
        return (self.record() or {}).get("database", "sqlite")

    def up(self, timeout: float = 60.0) -> ServiceStatus:
        process = None
        if self._pid() is not None and self._running_on() != self.database:
            raise RuntimeError(
                f"{self.name} runs on {self._running_on()}, not {self.database}: stop it first "
                f"(saeflow services down {self.name})"
            )
        if self.postgres is not None and not self.postgres.status().serving:
            raise RuntimeError(
                f"{self.name} keeps its data in PostgreSQL: start it first "
                "(saeflow services up --db postgres)"
            )
        if self._pid() is None:
            private_dir(self.dir)
            env = {**os.environ, **SERVICE_DEFAULTS, **self.server_env()}
            process = spawn(self.command(), self._log, env, rotate_log=True)
            record = {"pid": process.pid, "endpoint": self.endpoint, "database": self.database}
            self.keep_record(record)
        deadline = time.monotonic() + timeout
        while not _answers(self.health_url):
            # The child we just started is watched directly: until it has exec'd, its command
            # line is still ours, so the record check would call it gone.
            if process.poll() is not None if process else self._pid() is None:
                raise RuntimeError(f"{self.name} server exited; see {self._log}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} server not serving after {timeout:.0f} s; see {self._log}"
                )
            time.sleep(0.5)
        return self.status()

    def down(self) -> ServiceStatus:
        pid = self._pid()
        if pid is not None:
            terminate(pid)
        self.drop_record()
        return self.status()


class MlflowServer(_HttpServer):
    """`mlflow server`: SQLite in its state folder, artifacts proxied to the SeaweedFS store."""

    name = "mlflow"
    program = ("mlflow", "server")
    default_port = 5000

    def __init__(
        self,
        home: Path | None = None,
        port: int | None = None,
        s3: SeaweedFS | None = None,
        database: str | None = None,
    ):
        super().__init__(home, port, database)
        self.s3 = s3 or SeaweedFS(home)

    def options(self) -> list[str]:
        # PostgreSQL's URL holds its password: it goes in the environment (server_env).
        sqlite = ["--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}"]
        return [
            "--workers",
            "1",
            # Not a line per request (the log rotates all the same: deployments/rotating_log.py).
            "--uvicorn-opts",
            "--no-access-log",
            "--app-name",
            "basic-auth",
            *(sqlite if self.postgres is None else []),
            "--artifacts-destination",
            f"s3://{self.s3.bucket}/mlartifacts",
        ]

    @property
    def _auth_config(self) -> Path:
        return self.dir / "basic_auth.ini"

    @property
    def _auth_database(self) -> Path:
        return self.dir / "basic_auth.db"

    def server_env(self) -> dict[str, str]:
        s3 = self.s3.env(reveal=True)
        return {
            "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
            **{
                k: s3[k]
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            },
            # Only the tracking API and artifact proxy: no job runner (~0.4 GiB in all).
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # Basic auth: the admin account is seeded before start (deployments/mlflow_admin.py);
            # MLflow's start-up check of that account reads the password from here.
            "MLFLOW_AUTH_CONFIG_PATH": str(self._auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask_secret_key"),
            **({"MLFLOW_BACKEND_STORE_URI": self.postgres.url("mlflow")} if self.postgres else {}),
        }

    def up(self, timeout: float = 60.0) -> ServiceStatus:
        if not self.s3.status().serving:
            raise RuntimeError(
                "mlflow keeps its artifacts on the S3 store: start seaweedfs first "
                "(saeflow services up seaweedfs mlflow)"
            )
        private_dir(self.dir)
        seed_admin(self._auth_database, USER, self.secret("password"))
        write_private(
            self._auth_config,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self._auth_database}\n"
            f"admin_username = {USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        return super().up(timeout)

    def env(self, reveal: bool = False) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.endpoint,
            "MLFLOW_TRACKING_USERNAME": USER,
            "MLFLOW_TRACKING_PASSWORD": self.secret("password", reveal),
        }


class PrefectServer(_HttpServer):
    """`prefect server start`, its database and settings under its state folder."""

    name = "prefect"
    program = ("prefect", "server", "start")
    default_port = 4200

    def server_env(self) -> dict[str, str]:
        env = {
            "PREFECT_HOME": str(self.dir / "home"),
            "PREFECT_SERVER_API_AUTH_STRING": f"{USER}:{self.secret('password')}",
        }
        if self.postgres is not None:
            url = self.postgres.url("prefect", driver="postgresql+asyncpg")
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
        return env

    @property
    def marker(self) -> str:
        return f"--port {self.port}"  # its state folder is in its environment, not its arguments

    @property
    def health_url(self) -> str:
        return f"{self.endpoint}/api/health"

    def env(self, reveal: bool = False) -> dict[str, str]:
        return {
            "PREFECT_API_URL": f"{self.endpoint}/api",
            "PREFECT_API_AUTH_STRING": f"{USER}:{self.secret('password', reveal)}",
        }
