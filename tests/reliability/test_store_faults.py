"""A full disk or a failing write on the store: a clear failure, no manifest of an unfinished
dataset, no corrupted manifest, no half-written file left holding space, and a re-run (once the
disk has room again) that completes with nothing lost."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError

from sae_core.stages import extract as extract_stage
from sae_core.stages import sample as sample_stage
from sae_core.storage.store import MANIFEST, Store
from tests.reliability.conftest import committed, error_line, result_digests, store_problems

FULL = OSError(errno.ENOSPC, "No space left on device")


def fail_writes(monkeypatch: pytest.MonkeyPatch, matching: Callable[[str], bool]) -> list[str]:
    """Every Store write whose path `matching` accepts fails as on a full disk, after its data
    reached the temporary file (at fsync, as on a filesystem that allocates late); returns the
    paths refused. Writes run in several threads: only the refused write's own fsync fails."""
    refused: list[str] = []
    original, real_fsync = Store.write_bytes, os.fsync
    full = threading.local()

    def fsync(fd: int) -> None:
        if getattr(full, "now", False):
            raise FULL
        real_fsync(fd)

    def write_bytes(self: Store, rel: str, data: bytes | memoryview) -> None:
        full.now = matching(rel)
        try:
            if full.now:
                refused.append(rel)
            original(self, rel, data)
        finally:
            full.now = False

    monkeypatch.setattr("sae_core.storage.store.os.fsync", fsync)
    monkeypatch.setattr(Store, "write_bytes", write_bytes)
    return refused


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    fail_writes(monkeypatch, lambda rel: True)
    with pytest.raises(OSError, match="No space left"):
        store.write_bytes("stage/x/part.bin", b"data" * 1000)
    assert not (tmp_path / "stage/x/part.bin").exists()
    assert temporaries(tmp_path) == []


def test_a_failed_manifest_write_leaves_the_dataset_unfinished(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    fail_writes(monkeypatch, lambda rel: rel.endswith(MANIFEST))
    with pytest.raises(OSError, match="No space left"), store.writing("stage/x") as writer:
        writer.write_bytes("part.bin", b"data")
        writer.manifest = {"rows": 1}
    assert store.manifest("stage/x") is None
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    with store.writing("stage/x") as writer:  # room again: the next attempt commits
        writer.write_bytes("part.bin", b"data")
        writer.manifest = {"rows": 1}
    assert store.manifest("stage/x")["rows"] == 1


def test_a_failed_rewrite_keeps_the_committed_manifest_intact(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    with store.writing("stage/x") as writer:
        writer.manifest = {"rows": 1}
    before = (tmp_path / "stage/x" / MANIFEST).read_bytes()
    fail_writes(monkeypatch, lambda rel: True)
    with pytest.raises(OSError):
        store.write_json(f"stage/x/{MANIFEST}", {"rows": 2})
    assert (tmp_path / "stage/x" / MANIFEST).read_bytes() == before
    assert json.loads(before) == store.manifest("stage/x")


def test_full_disk_mid_extraction_then_the_rerun_resumes_and_loses_nothing(
    copied_store, made_store, tiny_config, monkeypatch
):
    """The disk fills after the first shards: the stage fails with the disk's error and
    commits nothing; with room again the re-run keeps the shards written and ends with the same
    dataset an undisturbed extraction made."""
    folder, tokens, acts = copied_store
    store = Store(str(folder))
    store.rm(acts.path)
    shards = iter(range(100))
    refused = fail_writes(monkeypatch, lambda rel: "shard-" in rel and next(shards) >= 3)
    with pytest.raises(OSError, match="No space left"):
        extract_stage.extract_activations(
            tokens, tiny_config.model, tiny_config.data, progress=False
        )
    assert refused and store.manifest(acts.path) is None
    assert temporaries(folder) == []
    kept = sorted((folder / acts.path).rglob("shard-*.parquet"))
    assert len(kept) == 3
    monkeypatch.undo()
    again = extract_stage.extract_activations(
        tokens, tiny_config.model, tiny_config.data, progress=False
    )
    assert again == acts
    assert store_problems(str(folder)) == []
    assert result_digests(str(folder)) == result_digests(str(made_store[0]))


def test_full_disk_while_sampling_tokens_commits_nothing(copied_store, tiny_config, monkeypatch):
    folder, tokens, _ = copied_store
    store = Store(str(folder))
    store.rm(tokens.path)
    fail_writes(monkeypatch, lambda rel: rel.endswith("train.parquet"))
    with pytest.raises(OSError, match="No space left"):
        sample_stage.sample_tokens(str(folder), tiny_config.model, tiny_config.data, progress=False)
    assert store.manifest(tokens.path) is None and temporaries(folder) == []
    monkeypatch.undo()
    assert (
        sample_stage.sample_tokens(str(folder), tiny_config.model, tiny_config.data, False)
        == tokens
    )


@pytest.mark.parametrize(
    "err",
    [FULL, EndpointConnectionError(endpoint_url="http://127.0.0.1:8333/bucket/key")],
    ids=["full-disk", "s3-unreachable"],
)
def test_a_storage_error_that_outlasts_the_retries_is_one_line(
    err: Exception, new_workspace, monkeypatch
):
    """What the CLI prints when the flow ends on a storage error (the flow itself: below)."""
    import flows.pipeline

    class Failing:  # the flow as the CLI uses it: given its task runner, then called
        def with_options(self, **options: object) -> Failing:
            return self

        def __call__(self, *args: object, **kwargs: object) -> None:
            raise err

    monkeypatch.setattr(flows.pipeline, "pipeline", Failing())
    ws = new_workspace("ws")
    result = ws.invoke(*ws.args())
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert f"storage error ({type(err).__name__}:" in line
    assert "run again: finished stages are kept" in line


@pytest.mark.slow
def test_full_disk_during_training_fails_the_run_clearly_then_the_rerun_completes(
    prefect, new_workspace, monkeypatch
):
    """Through Prefect: the training stage's writes fail (after its retries, here without
    waiting), the run ends on one error line and commits no SAE; the re-run completes."""
    from tasks.train import train_sae

    ws = new_workspace("ws")
    monkeypatch.setattr(train_sae, "retry_delay_seconds", [0.0] * train_sae.retries)
    refused = fail_writes(monkeypatch, lambda rel: rel.startswith(("sae/", "checkpoints/")))
    failed = ws.invoke(*ws.args())
    assert failed.exit_code == 2, failed.output
    assert "storage error (OSError: [Errno 28] No space left on device)" in error_line(
        failed.output
    )
    assert len({rel for rel in refused if rel.startswith("checkpoints/")}) == 1
    store = Store(ws.store)
    assert not [path for path in committed(store) if path.startswith("sae/")]
    assert ws.versions() == [] and temporaries(Path(ws.store)) == []
    monkeypatch.undo()
    again = ws.invoke(*ws.args())
    assert again.exit_code == 0, again.output
    assert store_problems(ws.store) == [] and len(ws.versions()) == 1
