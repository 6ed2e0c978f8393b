import json

import pytest

from sae_core.config import SAEConfig
from sae_core.errors import StoreError
from sae_core.storage.fingerprint import fingerprint, path_fingerprint
from sae_core.storage.store import MANIFEST, Store, safe_relpath


def test_fingerprint_ignores_key_order_and_int_float_spelling():
    assert fingerprint({"a": 1, "b": 2.0}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_fingerprint_of_configs_tracks_every_field():
    assert fingerprint(SAEConfig()) == fingerprint(SAEConfig())
    assert fingerprint(SAEConfig()) != fingerprint(SAEConfig(k=64))


def test_path_fingerprint_follows_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    before = path_fingerprint(str(tmp_path))
    assert path_fingerprint(str(tmp_path)) == before
    f.write_text("hellp")
    assert path_fingerprint(str(tmp_path)) != before


def test_commit_writes_manifest_last_and_only_on_success(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.writing("stage/abc") as w:
            w.write_bytes("data.bin", b"x")
            raise RuntimeError("killed mid-write")
    assert store.exists("stage/abc/data.bin")
    assert not store.is_committed("stage/abc")

    with store.writing("stage/abc") as w:
        w.write_bytes("other.bin", b"y")
        w.manifest = {"rows": 1}
    assert store.listdir("stage/abc") == [MANIFEST, "other.bin"]  # the old attempt was cleared
    manifest = store.manifest("stage/abc")
    assert manifest["rows"] == 1 and manifest["uri"].endswith("stage/abc")


def test_write_bytes_leaves_no_temporary_files(tmp_path):
    store = Store(str(tmp_path))
    store.write_json("x/y.json", {"a": 1})
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.json"]
    assert json.loads((tmp_path / "x" / "y.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("rel", ["../escape", "a/../../b", "a/.hidden", "/etc/passwd/..", "a/b c"])
def test_paths_cannot_escape_the_store(rel):
    with pytest.raises(StoreError):
        safe_relpath(rel)


def test_unsupported_scheme_is_refused():
    with pytest.raises(StoreError, match="unsupported scheme"):
        Store("ftp://host/x")


def test_check_reports_an_unwritable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="not usable"):
        Store(str(blocker / "store")).check()


def test_completion_marks_are_seen_one_by_one_and_as_a_listing(tmp_path):
    from sae_core.storage.store import DatasetWriter

    writer = DatasetWriter(Store(str(tmp_path)), "acts/x")
    assert not writer.is_done("train/00001") and writer.done_parts("train") == set()
    writer.mark_done("train/00001", {"shard": {}})
    assert writer.is_done("train/00001")
    assert not writer.is_done("train/00000") and not writer.is_done("eval/00001")
    assert writer.done_parts("train") == {"train/00001"}
