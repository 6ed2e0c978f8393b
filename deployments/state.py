"""What every service shares: its owner-only state folder under `$SAEFLOW_HOME/services/`, and
the status and protocol that `saeflow services` reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sae_core.env import saeflow_home


def services_home() -> Path:
    return saeflow_home() / "services"


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
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

    def purge(self) -> Purged | None: ...


@dataclass(frozen=True)
class Purged:
    """A service folder `purge` removed: its data, credentials and log."""

    path: Path
    size_bytes: int


class ServiceFolder:
    """A service's owner-only state folder, `$SAEFLOW_HOME/services/<name>/`, and the record of
    its running process (`server.json`, written by `up`, removed by `down`)."""

    name = ""

    def __init__(self, home: Path | None = None):
        self.dir = (home or services_home()) / self.name

    @property
    def record_file(self) -> Path:
        return self.dir / "server.json"

    def record(self) -> dict[str, Any] | None:
        """What `up` recorded of the running process (pid, endpoint, ...), or None."""
        return json.loads(self.record_file.read_text()) if self.record_file.exists() else None

    def keep_record(self, record: dict[str, Any]) -> None:
        self.record_file.write_text(json.dumps(record))

    def drop_record(self) -> None:
        self.record_file.unlink(missing_ok=True)

    def purge(self) -> Purged | None:
        """Remove the whole state folder (data, credentials, log); None if there was none.
        The caller stops the service first."""
        if not self.dir.exists():
            return None
        size = sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())
        shutil.rmtree(self.dir)
        return Purged(self.dir, size)
