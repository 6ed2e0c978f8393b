"""`saeflow services up` started for real: every port its servers listen on is on loopback, and
every request but a health check needs the credentials `saeflow services env` prints.

Slow (three servers start): `.venv/bin/pytest -m slow tests/reliability/test_services.py`."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> set[int]:
    """pid and its descendants (servers fork workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in found} - found
        found, grew = found | more, bool(more)
    return found


def listening(pid: int) -> list[str]:
    """`address:port` of every TCP socket the process tree of `pid` listens on (from /proc)."""
    inodes = set()
    for proc in _tree(pid):
        for fd in Path(f"/proc/{proc}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.append(f"{_address(address)}:{int(port, 16)}")
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def status_of(url: str, auth: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[list]:
    from deployments.seaweedfs import SeaweedFS
    from deployments.servers import MlflowServer, PrefectServer

    home = tmp_path_factory.mktemp("services")
    s3 = SeaweedFS(home, s3_port=_free_port(), port_base=random.randrange(20000, 40000, 100))
    started = [s3, MlflowServer(home, port=_free_port(), s3=s3), PrefectServer(home, _free_port())]
    try:
        try:
            s3.up()
        except FileNotFoundError as err:
            pytest.skip(str(err))
        for service in started[1:]:
            assert service.up(timeout=300).serving
        yield started
    finally:
        for service in reversed(started):
            service.down()


def test_every_listening_port_is_on_loopback(services) -> None:
    for service in services:
        ports = listening(service.status().pid)
        assert ports, service.name
        hosts = {port.rsplit(":", 1)[0] for port in ports}
        assert hosts <= {"127.0.0.1", "::1"}, (service.name, ports)
        print(f"{service.name}: listens on {', '.join(sorted(ports))}")


def test_s3_refuses_unsigned_requests(services) -> None:
    s3 = services[0]
    endpoint = s3.env()["AWS_ENDPOINT_URL"]
    assert status_of(f"{endpoint}/{s3.bucket}/") == 403


def test_mlflow_refuses_requests_without_its_credentials(services) -> None:
    mlflow = services[1]
    env = mlflow.env(reveal=True)
    search = f"{mlflow.endpoint}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status_of(f"{mlflow.endpoint}/health") == 200
    assert status_of(search) == 401
    assert status_of(search, "saeflow:wrong") == 401
    assert (
        status_of(search, f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}")
        == 200
    )


def test_prefect_refuses_requests_without_its_credentials(services) -> None:
    prefect = services[2]
    flows = f"{prefect.endpoint}/api/flows/filter"
    body = json.dumps({"limit": 1}).encode()
    assert status_of(f"{prefect.endpoint}/api/health") == 200
    assert status_of(flows, body=body) == 401
    assert status_of(flows, "saeflow:wrong", body=body) == 401
    assert status_of(flows, prefect.env(reveal=True)["PREFECT_API_AUTH_STRING"], body=body) == 200


def test_the_printed_environment_reads_secrets_from_owner_only_files(services) -> None:
    from deployments.services import export_lines

    private = ("secret_key", "identities.json", "password", "flask_secret_key", "basic_auth.ini")
    for service in services:
        hidden, revealed = service.env(), service.env(reveal=True)
        secrets = [value for key, value in revealed.items() if hidden[key] != value]
        assert secrets, service.name
        printed = "\n".join(export_lines(hidden, reveal=False))
        assert [s for s in secrets if s in printed] == [], service.name
        files = [p for p in Path(service.dir).iterdir() if p.name in private]
        assert files and all(f.stat().st_mode & 0o077 == 0 for f in files), files
