"""Content digests of local files, whatever their size, remembered in the state directory.

A file's digest is SHA-256 (SHA-NI makes it the fastest hash hashlib has on x86) over its
content, computed in chunks on every core: the digest of a file is SHA-256 of its size and
of its chunks' digests. It is remembered in `<state>/digests/`, one small JSON file per
path, next to the file's identity as `stat` gives it (size, mtime, ctime, inode, device):
while those are unchanged the file is not read again. Any write changes the ctime (which no
tool can set back), so new content under an old name, size and mtime is hashed afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sae_core.env import saeflow_home

CHUNK = 64 * 2**20  # bytes of a file one thread hashes
_READ = 4 * 2**20  # bytes read at a time
REMEMBERED_FROM = 2**20  # smaller files are hashed again each time: cheaper than the lookup
# A file changed this recently could change again within its timestamps' resolution, keeping
# the same identity: its digest is not remembered.
RACY_SECONDS = 2.0


def default_digest_cache() -> Path:
    return saeflow_home() / "digests"


def _chunk_digest(path: Path, start: int, length: int) -> bytes:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(_READ, max(length, 1))))
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        while length > 0:
            read = fh.readinto(buffer[: min(len(buffer), length)])
            if not read:  # the file shrank while it was read: its identity check catches that
                break
            digest.update(buffer[:read])  # hashlib and readinto release the GIL
            length -= read
    return digest.digest()


def hash_file(path: Path, size: int) -> str:
    """SHA-256 of `size` and the SHA-256 of each CHUNK of the file, chunks hashed in parallel."""
    starts = range(0, max(size, 1), CHUNK)
    digest = hashlib.sha256(str(size).encode())
    if len(starts) == 1:  # no threads for a small file: a folder may hold thousands
        digest.update(_chunk_digest(path, 0, size))
        return digest.hexdigest()
    with ThreadPoolExecutor(max_workers=min(len(starts), len(os.sched_getaffinity(0)))) as pool:
        for part in pool.map(
            lambda start: _chunk_digest(path, start, min(CHUNK, size - start)), starts
        ):
            digest.update(part)
    return digest.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_digest(path: Path, cache: Path | None = None) -> str:
    """The content digest of the local file `path` (symlinks followed), remembered in `cache`
    (default `<state>/digests`) against the file's identity."""
    path = Path(path).resolve()
    before = path.stat()
    if before.st_size < REMEMBERED_FROM:
        return hash_file(path, before.st_size)
    entry = (
        cache or default_digest_cache()
    ) / f"{hashlib.sha256(bytes(path)).hexdigest()[:32]}.json"
    identity = _identity(before)
    try:
        known = json.loads(entry.read_text())
        if known["path"] == str(path) and known["identity"] == identity:
            return known["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: hash the file
    started = time.time_ns()
    digest = hash_file(path, before.st_size)
    changed = max(before.st_mtime_ns, before.st_ctime_ns)
    if _identity(path.stat()) == identity and started - changed > RACY_SECONDS * 1e9:
        _remember(entry, {"path": str(path), "identity": identity, "digest": digest})
    return digest


def _remember(entry: Path, record: dict[str, object]) -> None:
    """Write `record` atomically; a state directory that cannot be written costs only speed."""
    tmp = entry.with_name(f"{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, entry)
    except OSError:
        tmp.unlink(missing_ok=True)
