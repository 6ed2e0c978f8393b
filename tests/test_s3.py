"""The pipeline's storage path against a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import pytest

from sae_core.store import Store, StoreError

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from deployments import seaweedfs

    try:
        server = seaweedfs.start(tmp_path_factory.mktemp("seaweedfs"), s3_port=18433, port_base=18500)
    except FileNotFoundError as err:
        pytest.skip(str(err))
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


def test_pipeline_on_s3(s3_server, prefect, tiny_llama_dir, tiny_corpus_dir):
    from test_pipeline import ALL_STAGES, run, tiny_config

    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, "s3://saeflow-it/run")
    result = run(config)
    assert list(result.stages) == ALL_STAGES
    assert result.sae.uri.startswith("s3://saeflow-it/run/sae/")
    store = Store("s3://saeflow-it/run")
    for ref in (result.tokens, result.activations, result.sae, result.evaluation.dataset):
        assert store.is_committed(ref.path), ref.path
    acts = store.manifest(result.activations.path)
    shards = store.listdir(f"{result.activations.path}/train")
    assert shards == sorted(s["name"].rsplit("/", 1)[-1] for s in acts["splits"]["train"]["shards"])
    # Nothing temporary is left behind on the server.
    everything = store.fs.find(store.root)
    assert not [p for p in everything if "tmp" in p.rsplit("/", 1)[-1] or "_probe" in p]
    assert 0 < result.evaluation.metrics["nmse"] < 1
    assert run(config).stages == dict.fromkeys(ALL_STAGES, "Cached")
