"""`saeflow services up` started for real: every port its servers listen on is on loopback, and
every request but a health check needs the credentials `saeflow services env` prints. SeaweedFS's
internal ports (master, volume, filer, admin; HTTP and gRPC) refuse the requests that once
listed, read and wrote the store without any credentials.

Slow (three servers start): `.venv/bin/pytest -m slow tests/reliability/test_services.py`."""

from __future__ import annotations

import base64
import json
import random
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.services import free_port, listening

pytestmark = [pytest.mark.slow, pytest.mark.s3]


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
    s3 = SeaweedFS(home, s3_port=free_port(), port_base=random.randrange(20000, 40000, 100))
    started = [s3, MlflowServer(home, port=free_port(), s3=s3), PrefectServer(home, free_port())]
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


def answer(url: str, context: ssl.SSLContext | None = None, form_file: bytes | None = None) -> str:
    """The HTTP status a request got, or why it got none (a TLS alert, a closed connection).
    `form_file`: a multipart upload (how the filer takes a write)."""
    request = urllib.request.Request(url)
    if form_file is not None:
        boundary = "saeflowprobe"
        request.data = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=file; filename=t.txt\r\n"
            f"Content-Type: text/plain\r\n\r\n".encode()
            + form_file
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return str(response.status)
    except urllib.error.HTTPError as err:
        return str(err.code)
    except (urllib.error.URLError, OSError) as err:
        return f"no answer: {getattr(err, 'reason', err)}"


def plaintext_http2_answers(port: int) -> bool:
    """Whether a port speaks HTTP/2 in the clear (an open gRPC port answers the client preface
    with its SETTINGS frame)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        try:
            return len(conn.recv(9)) == 9
        except OSError:
            return False


def _without_certificate() -> ssl.SSLContext:
    """TLS as an outsider: the server's certificate is not checked, none is presented."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _with_certificate(tls: Path) -> ssl.SSLContext:
    """TLS with the client certificate the S3 gateway presents."""
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    context.load_cert_chain(tls / "node.pem", tls / "node.key")
    return context


def test_seaweedfs_internal_ports_refuse_requests_without_credentials(services) -> None:
    """The issue's requests (list, read and write on the filer; the master's /dir/assign and
    /cluster/status; a volume read) on every port but S3's, over HTTP and TLS without a client
    certificate: none is served. Before: the filer listed and took a write (201)."""
    import boto3

    s3 = services[0]
    env = s3.env(reveal=True)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    client.put_object(Bucket=s3.bucket, Key="store/sae/x/sae.safetensors", Body=b"weights")
    s3_port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    internal = sorted({int(p.rsplit(":", 1)[1]) for p in listening(s3.status().pid)} - {s3_port})
    assert len(internal) >= 8, internal  # HTTP and gRPC of master, volume, filer and admin
    requests = [
        ("GET", f"/buckets/{s3.bucket}/store/sae/"),  # list
        ("GET", f"/buckets/{s3.bucket}/store/sae/x/sae.safetensors"),  # read
        ("POST", f"/buckets/{s3.bucket}/store/t.txt"),  # write
        ("GET", "/dir/assign"),
        ("GET", "/cluster/status"),
        ("GET", "/1,01637037d6"),  # a volume read
        ("GET", "/metrics"),
    ]
    served = []
    for port in internal:
        for scheme, context in (("http", None), ("https", _without_certificate())):
            for method, path in requests:
                body = b"written" if method == "POST" else None
                got = answer(f"{scheme}://127.0.0.1:{port}{path}", context, body)
                if got.startswith("2") or got.startswith("3"):
                    served.append(f"{method} {scheme}://127.0.0.1:{port}{path}: {got}")
        if plaintext_http2_answers(port):
            served.append(f"plaintext HTTP/2 (gRPC) on {port}")
    assert served == []
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="store/")["Contents"]
    assert [o["Key"] for o in listed] == ["store/sae/x/sae.safetensors"]  # nothing written

    # The control: the refusals come from the missing credentials, not a dead port. With the
    # gateway's certificate the master answers; the filer then still wants a signed token.
    tls = Path(s3.dir) / "tls"
    master, filer = s3.port_base + 1, s3.port_base + 3
    assert answer(f"https://127.0.0.1:{master}/cluster/status", _with_certificate(tls)) == "200"
    read = f"https://127.0.0.1:{filer}/buckets/{s3.bucket}/store/sae/x/sae.safetensors"
    assert answer(read, _with_certificate(tls)) == "401"


def test_the_http_servers_log_through_a_size_capped_log(services) -> None:
    """MLflow's server logged every request into a log that never rotated."""
    for server in services[1:]:
        command = Path(f"/proc/{server.status().pid}/cmdline").read_bytes().split(b"\0")
        assert b"deployments.rotating_log" in command, (server.name, command)
        assert (Path(server.dir) / "server.log").stat().st_size > 0
    assert b"--no-access-log" in Path(f"/proc/{services[1].status().pid}/cmdline").read_bytes()
