"""`saeflow services up|down|status|env`: local servers the pipeline can use instead of embedded state.

Each service keeps everything under `$SAEFLOW_HOME/services/<name>/` (owner-only): its data, its
credentials (generated once, then reused, so data written before a restart stays readable), the
record of the running process (`server.json`: pid, endpoint) and its log. `up` is idempotent,
`down` stops the recorded process only if that pid is still the service's own. Services register
in SERVICES; each one is a small class with up, down, status and env.

Secrets appear only in `env(reveal=True)` (the `services env` command, meant for
`eval "$(saeflow services env)"`); everything else prints a command that reads them from their
0600 file instead.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deployments import seaweedfs
from deployments.process import terminate
from deployments.servers import MlflowServer, PrefectServer
from sae_core.env import saeflow_home


def services_home() -> Path:
    return saeflow_home() / "services"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool  # the recorded process is alive and is this service's
    serving: bool  # it answers (for S3: an object round-trips)
    pid: int | None
    endpoint: str | None
    state_dir: str
    detail: str = ""


class Service(Protocol):
    name: str

    def up(self, timeout: float = 60.0) -> ServiceStatus: ...

    def down(self) -> ServiceStatus: ...

    def status(self) -> ServiceStatus: ...

    def env(self, reveal: bool = False) -> dict[str, str]:
        """The variables a client sets to use the service; secrets as a `$(cat FILE)` unless
        `reveal`."""
        ...


class SeaweedFS:
    """SeaweedFS's S3 gateway on loopback, with one bucket for the saeflow store."""

    name = "seaweedfs"

    def __init__(
        self,
        home: Path | None = None,
        s3_port: int = 8333,
        port_base: int = 0,
        bucket: str = "saeflow",
    ):
        self.dir = (home or services_home()) / self.name
        self.s3_port, self.port_base, self.bucket = s3_port, port_base, bucket

    # State -----------------------------------------------------------------------------------
    @property
    def _record(self) -> Path:
        return self.dir / "server.json"

    @property
    def _secret_file(self) -> Path:
        return self.dir / "secret_key"

    def credentials(self) -> seaweedfs.Credentials:
        """Generated on first use and kept (0600): the data stays readable across restarts."""
        _private_dir(self.dir)
        if not self._secret_file.exists():
            fresh = seaweedfs.Credentials.new()
            _write_private(self._secret_file, fresh.secret_key)
        return seaweedfs.Credentials("saeflow", self._secret_file.read_text().strip())

    def _server(self) -> seaweedfs.S3Server | None:
        """The recorded server, if there is a record."""
        if not self._record.exists():
            return None
        info = json.loads(self._record.read_text())
        creds = self.credentials()
        return seaweedfs.S3Server(
            info["endpoint"], creds.access_key, creds.secret_key, info["pid"], self.dir
        )

    # Commands --------------------------------------------------------------------------------
    def status(self) -> ServiceStatus:
        server = self._server()
        running = server is not None and server.is_running()
        serving = running and seaweedfs.round_trip(server, self.bucket)
        detail = f"bucket {self.bucket}, data in {self.dir / 'data'}, log {self.dir / 'weed.log'}"
        if server is not None and not running:
            detail = f"stale record (pid {server.pid} is gone); {detail}"
        return ServiceStatus(
            self.name,
            running,
            serving,
            server.pid if running else None,
            server.endpoint if server is not None else None,
            str(self.dir),
            detail,
        )

    def up(self, timeout: float = 60.0) -> ServiceStatus:
        server = self._server()
        if server is not None and server.is_running():
            seaweedfs.wait_ready(server, timeout, self.bucket)  # may still be starting
            return self.status()
        server = seaweedfs.start(
            _private_dir(self.dir),
            s3_port=self.s3_port,
            port_base=self.port_base,
            timeout=timeout,
            credentials=self.credentials(),
            bucket=self.bucket,
        )
        record = {
            "pid": server.pid,
            "endpoint": server.endpoint,
            "port_base": self.port_base,
            "started": time.time(),
        }
        self._record.write_text(json.dumps(record))
        return self.status()

    def down(self) -> ServiceStatus:
        server = self._server()
        if server is not None and server.is_running():
            terminate(server.pid)
        self._record.unlink(missing_ok=True)
        return self.status()

    def env(self, reveal: bool = False) -> dict[str, str]:
        server = self._server()
        endpoint = server.endpoint if server else f"http://127.0.0.1:{self.s3_port}"
        secret = (
            self.credentials().secret_key
            if reveal
            else f"$(cat {shlex.quote(str(self._secret_file))})"
        )
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": self.credentials().access_key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "SAEFLOW_STORE": f"s3://{self.bucket}/store",
        }


def export_lines(env: dict[str, str], reveal: bool) -> list[str]:
    """`export KEY=value` lines; a value holding `$(cat FILE)` is left for the shell to expand."""
    lines = []
    for key, value in env.items():
        if not reveal and "$(cat " in value:
            lines.append(f'export {key}="{value}"')
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    return lines


# In start order: MLflow keeps its artifacts on SeaweedFS (remote mode: deployments/servers.py).
SERVICES: dict[str, type[Service]] = {
    SeaweedFS.name: SeaweedFS,
    MlflowServer.name: MlflowServer,
    PrefectServer.name: PrefectServer,
}


def select(
    names: list[str] | None = None, options: dict[str, dict[str, object]] | None = None
) -> list[Service]:
    """The named services (all when none are named); `options[name]` goes to that constructor."""
    unknown = [n for n in names or [] if n not in SERVICES]
    if unknown:
        raise ValueError(f"unknown service {', '.join(unknown)}: choose from {', '.join(SERVICES)}")
    options = options or {}
    return [SERVICES[name](**options.get(name, {})) for name in names or SERVICES]
