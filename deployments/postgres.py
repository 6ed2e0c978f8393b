"""PostgreSQL for team setups: `saeflow services up --db postgres` runs one cluster on loopback,
the database of both the Prefect server and the MLflow tracking store (deployments/servers.py),
where SQLite (the default) reports `database is locked` under concurrent runs.

The binaries are a system PostgreSQL's (`initdb`, `postgres`): `$SAEFLOW_PG_BIN` names their
folder, else the newest Debian `/usr/lib/postgresql/N/bin`, else PATH. The cluster listens on
127.0.0.1 only, at a free port kept across restarts, and on a Unix socket beside its data;
every connection, socket included, needs the password of the one role (`saeflow`), generated
once and kept owner-only in the state folder (`password`, 0600). It holds two databases,
`prefect` and `mlflow`.

PostgreSQL refuses to run as root. Run by root, saeflow starts `initdb` and `postgres` as an
unprivileged account (`$SAEFLOW_PG_USER`, else `postgres` where it exists, else `nobody`),
without supplementary groups, and keeps the cluster that account owns (data and socket) in
`/var/lib/saeflow-postgres/<digest of the state folder>/`: the state folder is root's and
owner-only, so the account could not reach a cluster inside it. Anyone else keeps the cluster
in the state folder (`cluster/`).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

from deployments.process import Account, is_running, spawn, terminate
from deployments.state import (
    Purged,
    ServiceFolder,
    ServiceStatus,
    private_dir,
    write_private,
)

BIN_ENV = "SAEFLOW_PG_BIN"
USER_ENV = "SAEFLOW_PG_USER"
DEBIAN_BINS = Path("/usr/lib/postgresql")
ROOT_CLUSTERS = Path("/var/lib/saeflow-postgres")
ROLE = "saeflow"
DATABASES = ("prefect", "mlflow")
SOCKET_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL


def binaries() -> Path:
    """The folder holding PostgreSQL's `initdb` and `postgres`."""
    if configured := os.environ.get(BIN_ENV):
        folders = [Path(configured)]
    else:

        def version(folder: Path) -> tuple[int, ...]:
            return tuple(int(n) for n in re.findall(r"\d+", folder.parent.name))

        folders = sorted(DEBIAN_BINS.glob("*/bin"), key=version, reverse=True)
        if found := shutil.which("initdb"):
            folders.append(Path(found).parent)
    for folder in folders:
        if all((folder / tool).is_file() for tool in ("initdb", "postgres")):
            return folder
    where = f"{BIN_ENV}={configured}" if configured else f"{DEBIAN_BINS}/*/bin or PATH"
    raise FileNotFoundError(
        f"PostgreSQL's initdb and postgres are not in {where}: install PostgreSQL "
        f"(Debian: apt-get install postgresql) or set {BIN_ENV} to the folder holding them"
    )


def server_account() -> Account | None:
    """Who runs the server: None for the current user, an unprivileged account under root."""
    if os.geteuid() != 0:
        return None
    names = [os.environ[USER_ENV]] if os.environ.get(USER_ENV) else ["postgres", "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            break
        return Account(name, entry.pw_uid, entry.pw_gid)
    raise RuntimeError(
        f"PostgreSQL refuses to run as root and no unprivileged account ({', '.join(names)}) "
        f"exists to run it: set {USER_ENV} to one"
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Postgres(ServiceFolder):
    """A PostgreSQL cluster on loopback with the `prefect` and `mlflow` databases."""

    name = "postgres"

    # State -----------------------------------------------------------------------------------
    @property
    def cluster(self) -> Path:
        """The folder the server's account owns: `data/` and `socket/`."""
        if os.geteuid() != 0:
            return self.dir / "cluster"
        digest = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:16]
        return ROOT_CLUSTERS / digest

    @property
    def data(self) -> Path:
        return self.cluster / "data"

    @property
    def socket_dir(self) -> Path:
        return self.cluster / "socket"

    @property
    def _log(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def _port_file(self) -> Path:
        return self.dir / "port"

    @property
    def port(self) -> int | None:
        """The port the cluster listens on (drawn at its first start and kept while it stays
        free), or None before that."""
        return int(self._port_file.read_text()) if self._port_file.exists() else None

    def password(self) -> str:
        """The role's password: generated on first use, kept 0600 in the state folder."""
        path = self.dir / "password"
        if not path.exists():
            private_dir(self.dir)
            write_private(path, secrets.token_hex(16))
        return path.read_text().strip()

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL of `database`, password included (for a server's environment only,
        never a command line: other users read those)."""
        if self.port is None:
            raise RuntimeError("postgres has not been started: saeflow services up --db postgres")
        return f"{driver}://{ROLE}:{self.password()}@127.0.0.1:{self.port}/{database}"

    def _pid(self) -> int | None:
        if (record := self.record()) is None:
            return None
        return record["pid"] if is_running(record["pid"], marker=str(self.data)) else None

    # Commands --------------------------------------------------------------------------------
    def status(self) -> ServiceStatus:
        pid = self._pid()
        account = (self.record() or {}).get("account")
        runs_as = f", run as {account}" if pid and account else ""
        return ServiceStatus(
            self.name,
            running=pid is not None,
            serving=pid is not None and self._answers(),
            pid=pid,
            endpoint=f"postgresql://127.0.0.1:{self.port}" if self.port else None,
            state_dir=str(self.dir),
            detail=(
                f"databases {', '.join(DATABASES)}; data in {self.data}{runs_as}; log {self._log}"
            ),
        )

    def up(self, timeout: float = 60.0) -> ServiceStatus:
        process = None
        if self._pid() is None:
            bin_dir, account = binaries(), server_account()
            private_dir(self.dir)
            if not (self.data / "PG_VERSION").exists():
                self._initdb(bin_dir, account)
            port = self.port if self.port and port_is_free(self.port) else free_port()
            write_private(self._port_file, str(port))
            socket_file = self.socket_dir / f".s.PGSQL.{port}"
            if len(str(socket_file)) > SOCKET_PATH_MAX:
                raise RuntimeError(
                    f"postgres: its socket path {socket_file} is over the {SOCKET_PATH_MAX} "
                    "characters Unix allows: use a shorter SAEFLOW_HOME"
                )
            options = {
                "listen_addresses": "127.0.0.1",
                "port": str(port),
                "unix_socket_directories": str(self.socket_dir),
                "unix_socket_permissions": "0700",
            }
            args = [str(bin_dir / "postgres"), "-D", str(self.data)]
            args += [arg for key, value in options.items() for arg in ("-c", f"{key}={value}")]
            process = spawn(args, self._log, cwd=self.cluster, account=account)
            self.keep_record(
                {
                    "pid": process.pid,
                    "port": port,
                    "account": account.name if account else None,
                    "started": time.time(),
                }
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if process.poll() is not None if process else self._pid() is None:
                raise RuntimeError(f"postgres exited; see {self._log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not serving after {timeout:.0f} s; see {self._log}")
            time.sleep(0.3)
        self._create_databases()
        return self.status()

    def down(self) -> ServiceStatus:
        if (pid := self._pid()) is not None:
            terminate(pid, leader_signal=signal.SIGINT)  # fast shutdown: clients disconnected
        self.drop_record()
        return self.status()

    def env(self, reveal: bool = False) -> dict[str, str]:
        """Nothing: only the servers connect to it (deployments/servers.py)."""
        return {}

    def purge(self) -> Purged | None:
        """The state folder and, where root kept it elsewhere, the cluster."""
        size = 0
        if self.cluster.exists() and not self.cluster.is_relative_to(self.dir):
            size = sum(f.stat().st_size for f in self.cluster.rglob("*") if f.is_file())
            shutil.rmtree(self.cluster)
        purged = super().purge()
        if purged is None:
            return Purged(self.cluster, size) if size else None
        return Purged(purged.path, purged.size_bytes + size)

    # Helpers -----------------------------------------------------------------------------------
    def _initdb(self, bin_dir: Path, account: Account | None) -> None:
        """A new cluster whose one role, `saeflow`, logs in with the password, locally too."""
        import subprocess

        self.cluster.parent.mkdir(parents=True, exist_ok=True)
        private_dir(self.cluster)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        password_file = self.cluster / "initdb-password"
        write_private(password_file, self.password())
        if account is not None:
            for path in (self.cluster, self.socket_dir, password_file):
                os.chown(path, account.uid, account.gid)
        try:
            done = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    f"--pgdata={self.data}",
                    f"--username={ROLE}",
                    f"--pwfile={password_file}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                cwd=self.cluster,
                **(account.popen_options() if account else {}),
            )
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)  # a half-made cluster would not start
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"postgres: initdb failed: {' '.join(last)}")

    def _connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=ROLE,
            password=self.password(),
            dbname=database,
            connect_timeout=2,
        )

    def _answers(self) -> bool:
        """A query is answered (the port alone opens before the cluster is ready)."""
        import psycopg2

        if self.port is None:
            return False
        try:
            connection = self._connect()
        except psycopg2.Error:
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                return cursor.fetchone() == (1,)
        except psycopg2.Error:
            return False
        finally:
            connection.close()

    def _create_databases(self) -> None:
        connection = self._connect()
        connection.autocommit = True  # CREATE DATABASE runs outside a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT datname FROM pg_database")
                present = {row[0] for row in cursor.fetchall()}
                for database in DATABASES:
                    if database not in present:
                        cursor.execute(f'CREATE DATABASE "{database}" OWNER "{ROLE}"')
        finally:
            connection.close()
