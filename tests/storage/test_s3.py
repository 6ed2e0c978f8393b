"""The pipeline's storage path against a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import pytest

from sae_core.errors import StoreError
from sae_core.storage.store import Store

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from deployments import seaweedfs

    try:
        server = seaweedfs.start(
            tmp_path_factory.mktemp("seaweedfs"), s3_port=18433, port_base=18500
        )
    except FileNotFoundError as err:
        pytest.skip(str(err))
    for bucket in ("saeflow-test", "saeflow-it"):  # a store never creates its bucket
        seaweedfs.create_bucket(server, bucket)
    mp = pytest.MonkeyPatch()
    for key, value in server.env().items():
        mp.setenv(key, value)
    yield server
    mp.undo()
    seaweedfs.stop(server)


def test_commit_protocol_on_s3(s3_server):
    store = Store("s3://saeflow-test/unit")
    store.check()
    with pytest.raises(RuntimeError):
        with store.writing("stage/x") as w:
            w.write_bytes("part.bin", b"data")
            raise RuntimeError("interrupted")
    assert not store.is_committed("stage/x")
    with store.writing("stage/x") as w:
        w.write_bytes("part.bin", b"data")
        w.manifest = {"rows": 4}
    assert store.manifest("stage/x")["rows"] == 4
    assert store.read_bytes("stage/x/part.bin") == b"data"


def test_wrong_credentials_are_refused(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match="not usable"):
        Store("s3://saeflow-test/denied").check()


def test_a_missing_bucket_is_one_line_naming_the_fix_and_is_not_created(s3_server):
    import boto3

    from deployments import seaweedfs

    with pytest.raises(StoreError) as err:
        Store("s3://no-such-bucket/x").check()
    message = str(err.value)
    assert "\n" not in message
    assert "bucket 'no-such-bucket' does not exist" in message
    assert "saeflow services bucket no-such-bucket" in message
    admin = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.admin.access_key,
        aws_secret_access_key=s3_server.admin.secret_key,
        region_name="us-east-1",
    )
    listed = {b["Name"] for b in admin.list_buckets()["Buckets"]}
    assert "no-such-bucket" not in listed and "saeflow-test" in listed
    # The identity clients get may not create one either (SeaweedFS lets an admin identity
    # create a bucket on upload): only `services bucket` (the admin identity) does.
    client = boto3.client("s3", **_client_args(s3_server))
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.create_bucket(Bucket="no-such-bucket")
    with pytest.raises(client.exceptions.ClientError, match="NoSuchBucket"):
        client.put_object(Bucket="no-such-bucket", Key="x", Body=b"1")
    assert seaweedfs.create_bucket(s3_server, "no-such-bucket")
    assert not seaweedfs.create_bucket(s3_server, "no-such-bucket")  # there already
    Store("s3://no-such-bucket/x").check()
    with pytest.raises(ValueError, match="bucket name 'Bad_Name'"):
        seaweedfs.create_bucket(s3_server, "Bad_Name")


def _client_args(server) -> dict[str, str]:
    return {
        "endpoint_url": server.endpoint,
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        "region_name": "us-east-1",
    }


def test_a_store_collected_inside_an_event_loop_closes_its_client_without_a_stray_error(
    s3_server,
):
    """`prefect flow-run retry` runs the flow inside an event loop; a Store collected there
    had s3fs close its client on that loop instead of fsspec's, and asyncio printed "Task
    exception was never retrieved" (aiohttp: "attached to a different loop")."""
    import asyncio
    import gc

    stray: list[dict] = []

    def used_and_dropped() -> None:
        store = Store("s3://saeflow-test/collected")
        store.check()  # replaces its filesystem by a fresh one: two clients to close
        store.write_bytes("x.bin", b"x")
        assert store.read_bytes("x.bin") == b"x"

    async def inside_a_loop() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: stray.append(context))
        used_and_dropped()
        gc.collect()  # the filesystems' finalizers run here, on this loop's thread
        await asyncio.sleep(0.5)  # where a misplaced close would run and fail

    asyncio.run(inside_a_loop())
    gc.collect()  # an unretrieved task reports itself when it is collected
    assert [context["message"] for context in stray] == []


def test_resumable_writes_on_s3(s3_server):
    store = Store("s3://saeflow-test/resume")
    store.check()
    with pytest.raises(RuntimeError), store.resuming("acts/x") as w:
        w.write_bytes("train/shard-00000.parquet", memoryview(b"rows"))
        w.mark_done("train/00000", {"next_batch": 3})
        raise RuntimeError("killed")
    with store.resuming("acts/x") as w:
        assert w.done_marks("train") == {"00000": {"next_batch": 3}}
        w.manifest = {"rows": 1}
    assert store.is_committed("acts/x")
    assert store.listdir("acts/x") == ["_MANIFEST.json", "train"]


def test_pipeline_on_s3(s3_server, prefect, tiny_llama_dir, tiny_corpus_dir):
    from tests.helpers.pipeline import ALL_STAGES, run, tiny_config

    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, "s3://saeflow-it/run")
    result = run(config)
    assert list(result.stages) == ALL_STAGES
    assert result.sae.uri.startswith("s3://saeflow-it/run/sae/")
    store = Store("s3://saeflow-it/run")
    for ref in (result.tokens, result.activations, result.sae, result.evaluation.dataset):
        assert store.is_committed(ref.path), ref.path
    # Layout: one folder per stage, only committed datasets below it; the finished SAE's
    # checkpoint went with its commit (SeaweedFS may keep the emptied `checkpoints/`).
    stages = set(store.listdir(""))
    assert stages >= {"tokens", "activations", "validation", "sae", "eval"}
    assert store.listdir("checkpoints") == []
    for stage in stages - {"checkpoints"}:
        for fp in store.listdir(stage):
            assert store.is_committed(f"{stage}/{fp}"), f"{stage}/{fp}"
    acts = store.manifest(result.activations.path)
    assert acts["kind"] == "activations" and acts["width"] == 64 and acts["dtype"] == "float32"
    assert store.listdir(result.activations.path) == ["_MANIFEST.json", "eval", "train"]
    for split in ("train", "eval"):
        listed = [s["name"].rsplit("/", 1)[-1] for s in acts["splits"][split]["shards"]]
        assert store.listdir(f"{result.activations.path}/{split}") == sorted(listed)
        assert (
            sum(s["rows"] for s in acts["splits"][split]["shards"]) == acts["splits"][split]["rows"]
        )
    # The validation's data docs are on the server, linked from the report.
    docs = result.validation.docs
    assert (
        docs == f"s3://saeflow-it/run/validation/{result.activations.fingerprint}/docs/index.html"
    )
    assert store.exists(docs.removeprefix("s3://saeflow-it/run/"))
    # Nothing temporary is left behind on the server: no local-style temporaries, no probes,
    # no completion marks of a finished extraction.
    everything = store.fs.find(store.root)
    assert not [p for p in everything if ".tmp-" in p or "_probe" in p or "/_progress/" in p]
    assert 0 < result.evaluation.metrics["nmse"] < 1
    assert run(config).stages == dict.fromkeys(ALL_STAGES, "cached")


def test_services_up_status_down_keep_data(tmp_path, monkeypatch):
    from deployments.seaweedfs import SeaweedFS

    monkeypatch.setenv("SAEFLOW_HOME", str(tmp_path / "home"))
    service = SeaweedFS(s3_port=18633, port_base=18700)
    try:
        status = service.up()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    try:
        assert status.running and status.serving and status.endpoint == "http://127.0.0.1:18633"
        state = tmp_path / "home/services/seaweedfs"
        for private in ("secret_key", "identities.json"):
            assert (state / private).stat().st_mode & 0o077 == 0, private
        assert service.up().pid == status.pid  # idempotent
        hidden = service.env()
        assert hidden["AWS_SECRET_ACCESS_KEY"].startswith("$(cat ")
        revealed = service.env(reveal=True)
        secret = revealed["AWS_SECRET_ACCESS_KEY"]
        assert secret not in (state / "weed.log").read_text()
        for key, value in revealed.items():
            monkeypatch.setenv(key, value)
        Store().write_bytes("kept/object", b"still here")  # SAEFLOW_STORE: the service's bucket
        down = service.down()
        assert not down.running and not (state / "server.json").exists()
        restarted = SeaweedFS(s3_port=18633, port_base=18700).up()
        assert restarted.serving and restarted.pid != status.pid
        assert service.env(reveal=True)["AWS_SECRET_ACCESS_KEY"] == secret
        assert Store(revealed["SAEFLOW_STORE"]).read_bytes("kept/object") == b"still here"
    finally:
        service.down()
    assert not service.status().running


def test_services_cli(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("SAEFLOW_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    ports = ["--s3-port", "18643", "--port-base", "18720"]
    up = runner.invoke(app, ["services", "up", "seaweedfs", *ports])
    try:
        assert up.exit_code == 0, up.output
        secret = (tmp_path / "home/services/seaweedfs/secret_key").read_text()
        assert "seaweedfs: serving at http://127.0.0.1:18643" in up.output
        assert secret not in up.output  # `up` points at the secret file instead
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:18643" in up.output
        env = runner.invoke(app, ["services", "env", "seaweedfs"]).output
        assert f"export AWS_SECRET_ACCESS_KEY={secret}" in env
        status = json.loads(
            runner.invoke(app, ["services", "status", "seaweedfs", "--json"]).output
        )
        assert status["seaweedfs"]["serving"] is True
        made = runner.invoke(app, ["services", "bucket", "team-store"])
        assert made.exit_code == 0 and "bucket team-store: created" in made.output, made.output
        again = runner.invoke(app, ["services", "bucket", "team-store"])
        assert "bucket team-store: exists already" in again.output
        bad = runner.invoke(app, ["services", "bucket", "Team_Store"])
        assert bad.exit_code == 2 and "bucket name 'Team_Store'" in bad.output
    finally:
        down = runner.invoke(app, ["services", "down", "seaweedfs"])
    assert "seaweedfs: stopped" in down.output
    bad = runner.invoke(app, ["services", "status", "nosuch"])
    assert bad.exit_code == 2 and "unknown service nosuch" in bad.output
