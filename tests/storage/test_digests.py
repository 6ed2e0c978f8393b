"""Content digests of local files: every byte counts at any size, and a digest is remembered
against the file's identity, so an unchanged file is not read again and a changed one is."""

from __future__ import annotations

import os
import time

import pytest

from sae_core.storage import digests
from sae_core.storage.digests import file_digest


@pytest.fixture
def remembered_at_once(monkeypatch):
    """Digests of files written a moment ago are remembered too (tests write and read at once)."""
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)


def _big_file(path, size=digests.REMEMBERED_FROM + 4096, fill=b"a"):
    path.write_bytes(fill * size)
    return path


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch, remembered_at_once):
    weights = _big_file(tmp_path / "model.safetensors")
    first = file_digest(weights, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def unread(*args):
        raise AssertionError("an unchanged file was hashed again")

    monkeypatch.setattr(digests, "hash_file", unread)
    assert file_digest(weights, tmp_path / "cache") == first


def test_new_content_under_the_same_name_size_and_mtime_is_hashed_afresh(
    tmp_path, remembered_at_once
):
    weights = _big_file(tmp_path / "model.safetensors")
    before = file_digest(weights, tmp_path / "cache")
    stat = weights.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick
    with open(weights, "r+b") as fh:  # in place: same inode, same size
        fh.seek(stat.st_size // 2)
        fh.write(b"b")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` do
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_digest(weights, tmp_path / "cache") != before


def test_a_file_changed_a_moment_ago_is_hashed_but_not_remembered(tmp_path):
    weights = _big_file(tmp_path / "model.safetensors")
    file_digest(weights, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_every_chunk_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CHUNK", 1000)  # 5 chunks hashed in parallel
    data = bytearray(b"x" * 4500)
    (tmp_path / "f").write_bytes(data)
    seen = {file_digest(tmp_path / "f")}
    for at in (0, 999, 1000, 4499):
        changed = bytearray(data)
        changed[at] = ord("y")
        (tmp_path / "f").write_bytes(changed)
        seen.add(file_digest(tmp_path / "f"))
    (tmp_path / "f").write_bytes(data + b"x")  # one byte longer
    seen.add(file_digest(tmp_path / "f"))
    assert len(seen) == 6
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f") in seen


def test_a_symlinked_file_has_its_targets_digest(tmp_path):
    target = _big_file(tmp_path / "blob")
    (tmp_path / "link").symlink_to(target)
    assert file_digest(tmp_path / "link") == file_digest(target)
