"""What a store holds and what of it is garbage (sae_core.storage.housekeeping), and lock files
removed only when free (sae_core.storage.locks): no registry, no Prefect."""

from __future__ import annotations

import time

import pytest

from sae_core.storage.housekeeping import garbage, inventory, users
from sae_core.storage.locks import file_lock, is_held, remove_if_free
from sae_core.storage.store import Store

DAY = 24 * 3600


def commit(store: Store, path: str, **links: object) -> None:
    store.write_bytes(f"{path}/data.bin", b"x" * 100)
    store.write_json(f"{path}/_MANIFEST.json", {"kind": path.split("/")[0], **links})


@pytest.fixture
def store(tmp_path) -> Store:
    """tokens/t -> activations/a -> sae/s (committed, registered) with its checkpoint left;
    sae/u (committed, unregistered) with its checkpoint; checkpoints/w of an SAE still
    training; an unfinished attempt sae/x; activations/m committed with completion marks left."""
    store = Store(str(tmp_path / "store"))
    uri = store.uri
    commit(store, "tokens/t")
    commit(store, "activations/a", tokens={"uri": f"{uri}/tokens/t", "fingerprint": "t"})
    commit(store, "sae/s", activations=f"{uri}/activations/a")
    commit(store, "sae/u", activations=f"{uri}/activations/a")
    commit(store, "eval/e", sae=f"{uri}/sae/s", tokens=f"{uri}/tokens/t")
    for fp in ("s", "u", "w"):
        store.write_bytes(f"checkpoints/{fp}/last.safetensors", b"c" * 10)
    store.write_bytes("sae/x/sae.safetensors", b"half")
    commit(store, "activations/m")
    store.write_json("activations/m/_progress/train/00000.json", {})
    return store


def test_inventory_reads_sizes_times_and_lineage(store):
    folders = {f.path: f for f in inventory(store)}
    assert set(folders) == {
        "tokens/t", "activations/a", "activations/m", "sae/s", "sae/u", "sae/x", "eval/e",
        "checkpoints/s", "checkpoints/u", "checkpoints/w",
    }  # fmt: skip
    assert folders["sae/s"].inputs == ("activations/a",)
    assert folders["activations/a"].inputs == ("tokens/t",)  # a link inside a nested object
    assert folders["eval/e"].inputs == ("sae/s", "tokens/t")
    assert folders["sae/s"].committed and not folders["sae/x"].committed
    assert folders["sae/x"].created is None and folders["sae/s"].created <= time.time()
    assert folders["checkpoints/s"].size == 10 and folders["sae/x"].size == 4
    assert folders["activations/m"].marks_left and not folders["activations/a"].marks_left


def test_a_registered_version_uses_what_its_datasets_were_made_from(store):
    used = users(inventory(store), {"eval/e": {"m v1"}, "sae/s": {"m v1"}, "sae/u": {"m v2"}})
    assert used["tokens/t"] == used["activations/a"] == {"m v1", "m v2"}
    assert used["sae/s"] == {"m v1"} and "sae/x" not in used and "checkpoints/s" not in used


def test_garbage_is_finished_checkpoints_old_attempts_and_left_marks(store):
    folders = inventory(store)
    needed = users(folders, {"eval/e": {"m v1"}})
    found = {g.path: g.reason for g in garbage(folders, needed, time.time() + 2 * DAY, DAY)}
    assert found == {
        "checkpoints/s": "checkpoint of a committed SAE",
        "checkpoints/u": "checkpoint of a committed SAE",
        "sae/x": "unfinished attempt",
        "activations/m/_progress": "completion marks of a committed dataset",
    }  # checkpoints/w is resume state of an SAE not committed yet: kept
    fresh = {g.path for g in garbage(folders, needed, time.time(), DAY)}
    assert "sae/x" not in fresh  # written minutes ago: maybe a run at work


def test_what_a_registered_version_needs_is_never_garbage(store):
    """Even when it looks like garbage: an unfinished folder at a path a version names (a
    dataset being recomputed) and a checkpoint a version's run named."""
    folders = inventory(store)
    needed = users(folders, {"sae/x": {"m v3"}, "checkpoints/s": {"m v1"}, "sae/s": {"m v1"}})
    found = {g.path for g in garbage(folders, needed, time.time() + 2 * DAY, 0)}
    assert not found & set(needed)
    assert found == {"checkpoints/u", "activations/m/_progress"}


def test_a_lock_file_is_removed_only_when_free(tmp_path):
    path = tmp_path / "locks" / "a.lock"
    assert not is_held(path) and not path.parent.exists()  # asking creates nothing
    with file_lock(path):
        assert is_held(path)
        assert not remove_if_free(path) and path.exists()  # held: kept
    assert not is_held(path)
    assert remove_if_free(path, dry_run=True) and path.exists()
    assert remove_if_free(path) and not path.exists()
    assert not remove_if_free(path)  # already gone
    with file_lock(path, timeout=1):  # recreated on the next use
        assert path.exists()


def test_a_lock_taken_on_a_file_removed_meanwhile_is_taken_again_on_the_new_file(
    tmp_path, monkeypatch
):
    """The race gc's removal opens: a process opens the lock file, gc removes it, the process
    locks the removed file. It must notice and lock the file now at the path, or a second
    process could hold the same lock at once."""
    import os

    from sae_core.storage import locks

    path = tmp_path / "b.lock"
    path.touch()
    real_flock = locks.fcntl.flock
    removed = []

    def flock_after_removal(fd, flags):
        if not removed:  # between the holder's open and its lock, gc removes the file
            removed.append(None)
            monkeypatch.setattr(locks.fcntl, "flock", real_flock)
            removed[0] = remove_if_free(path)
        return real_flock(fd, flags)

    monkeypatch.setattr(locks.fcntl, "flock", flock_after_removal)
    with file_lock(path, timeout=1):
        assert removed == [True] and path.exists()
        fd = os.open(path, os.O_RDWR)
        try:  # the file at the path is the one held
            with pytest.raises(BlockingIOError):
                locks.fcntl.flock(fd, locks.fcntl.LOCK_EX | locks.fcntl.LOCK_NB)
        finally:
            os.close(fd)
