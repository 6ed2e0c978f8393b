"""The S3 store under faults, against a real server (SeaweedFS on loopback): stopped and
restarted during extraction and during training, the run completes through its retries; kept
down past the retry budget, the run fails with one clear line and a re-run completes. No object
is corrupted: the results equal a local run's. And the run's credentials, from the environment
or a profile, appear nowhere the run writes.

Slow: `.venv/bin/pytest -m slow tests/reliability/test_s3_faults.py` (skipped without `weed`).
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from sae_core.storage.store import Store
from tests.reliability.conftest import (
    Reference,
    Workspace,
    error_line,
    result_digests,
    store_problems,
)

pytestmark = [pytest.mark.slow, pytest.mark.s3]
SHORT_OUTAGE_S = 8.0
BUCKET = "reliability"  # created with the server: a store never creates its bucket
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A SeaweedFS server that can be stopped and started again on its ports, data and keys."""

    def __init__(self, folder: Path):
        from deployments import seaweedfs

        self.folder, self.port = folder, _free_port()
        self.port_base = random.randrange(20000, 40000, 100)
        self.server = seaweedfs.start(
            folder, s3_port=self.port, port_base=self.port_base, bucket=BUCKET
        )

    def env(self) -> dict[str, str]:
        return self.server.env()

    def down(self) -> None:
        from deployments import seaweedfs

        seaweedfs.stop(self.server)

    def up(self) -> None:
        from deployments import seaweedfs

        keys = seaweedfs.Credentials(self.server.access_key, self.server.secret_key)
        self.server = seaweedfs.start(
            self.folder,
            s3_port=self.port,
            port_base=self.port_base,
            credentials=keys,
            bucket=BUCKET,
        )


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    try:
        server = S3(tmp_path_factory.mktemp("seaweedfs"))
    except FileNotFoundError as err:
        pytest.skip(str(err))
    yield server
    server.down()


def s3_workspace(new_workspace, s3: S3, name: str, prefect_api: str | None) -> Workspace:
    return new_workspace(name, store=f"s3://{BUCKET}/{name}", prefect_api=prefect_api, env=s3.env())


def wait_for(signal: Path, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not signal.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def stage_writes(log: Path, pattern: str) -> int:
    """How many store writes (attempts) the run has logged into the stage's folder so far."""
    return sum(pattern in line for line in log.read_text().splitlines()) if log.exists() else 0


def with_env(s3: S3, fn: Callable[[], T]) -> T:
    """Run `fn()` with the server's AWS_* variables set in this process (to read the store)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        return fn()


@pytest.mark.parametrize(
    "stage, pattern",
    [("extraction", "activations/"), ("training", "checkpoints/")],
    ids=["during-extraction", "during-training"],
)
def test_a_short_outage_is_ridden_out_by_the_retries(
    stage: str, pattern: str, s3: S3, new_workspace, prefect_api: str, reference: Reference
) -> None:
    ws = s3_workspace(new_workspace, s3, f"outage-{stage}", prefect_api)
    signal, log = ws.root / "reached", ws.root / "writes.txt"
    # Each write of the stage waits a little: the outage lands while the stage runs.
    proc = ws.spawn(
        RELIABILITY_SIGNAL=f"{pattern}:{signal}",
        RELIABILITY_SLOW=f"{pattern}:0.5",
        RELIABILITY_WRITES=str(log),
    )
    wait_for(signal, proc)
    s3.down()
    before = stage_writes(log, pattern)
    time.sleep(SHORT_OUTAGE_S)
    s3.up()
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-3000:]
    after = stage_writes(log, pattern)
    assert after > before  # the stage still had writes to make when the server stopped
    print(
        f"{stage}: {after - before} of the stage's {after} write attempts came after the server "
        f"stopped; Prefect task retries: {output.count('Retry ')}"
    )
    assert with_env(s3, lambda: store_problems(ws.store)) == []
    assert len(ws.versions()) == 1
    results = with_env(s3, lambda: result_digests(ws.store))
    assert results == result_digests(reference.workspace.store)


def test_an_outage_past_the_retry_budget_fails_clearly_then_a_rerun_completes(
    s3: S3, new_workspace, prefect_api: str, reference: Reference
) -> None:
    ws = s3_workspace(new_workspace, s3, "long-outage", prefect_api)
    signal = ws.root / "reached"
    proc = ws.spawn(
        RELIABILITY_SIGNAL=f"activations/:{signal}", RELIABILITY_SLOW="activations/:0.5"
    )
    wait_for(signal, proc)
    s3.down()
    try:
        output = proc.communicate(timeout=900)[0]
    finally:
        s3.up()
    assert proc.returncode == 2, output[-3000:]
    line = error_line(output)
    assert "storage error (" in line and "run again: finished stages are kept" in line, line
    assert "Retry 3/3" in output  # the task's whole retry budget was spent first
    assert with_env(s3, lambda: store_problems(ws.store)) == []
    code, output = ws.run()
    assert code == 0, output[-3000:]
    assert with_env(s3, lambda: store_problems(ws.store)) == []
    assert len(ws.versions()) == 1
    results = with_env(s3, lambda: result_digests(ws.store))
    assert results == result_digests(reference.workspace.store)


def test_credentials_from_a_profile_reach_the_store(s3: S3, tmp_path: Path, monkeypatch) -> None:
    env = s3.env()
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[reliability]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", env["AWS_DEFAULT_REGION"])
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "reliability")
    store = Store(f"s3://{BUCKET}/profile")
    store.check()
    store.write_bytes("object", b"by profile")
    assert store.read_bytes("object") == b"by profile"


def test_the_secret_appears_nowhere_the_run_writes(s3: S3, new_workspace) -> None:
    """A whole run on S3 with its own Prefect server (its database, logs, parameters and
    artifacts then live in the workspace): the secret is in no file of the workspace (state
    directory, MLflow database and artifacts, Prefect's database and results), no object on the
    store, and not in the run's output."""
    ws = s3_workspace(new_workspace, s3, "secret-scan", prefect_api=None)
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"].encode()
    code, output = ws.run()
    assert code == 0, output[-3000:]
    assert secret not in output.encode()
    files = [p for p in ws.root.rglob("*") if p.is_file()]
    assert (ws.home / "mlflow.db").exists() and (ws.home / "prefect" / "prefect.db").exists()
    assert [p for p in files if secret in p.read_bytes()] == []
    store = with_env(s3, lambda: Store(ws.store))
    objects = with_env(s3, lambda: store.fs.find(store.root))
    assert objects
    leaked = with_env(s3, lambda: [o for o in objects if secret in store.fs.cat_file(o)])
    assert leaked == []
    print(f"scanned {len(files)} files, {len(objects)} store objects and the run's output")
