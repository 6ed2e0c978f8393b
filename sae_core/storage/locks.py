"""An exclusive lock between processes that share saeflow's state directory.

`fcntl.flock` on a lock file: the kernel releases it when its holder exits or crashes, so a
killed process never leaves a stale lock behind (an O_EXCL marker file would). The files
themselves stay; `remove_if_free` deletes one nobody holds (`saeflow gc`), and a process that
locked a file just deleted that way sees it and locks the new one instead.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sae_core.errors import LockTimeout


@contextmanager
def file_lock(
    path: Path,
    timeout: float = 60.0,
    poll: float = 0.05,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the duration of the block.

    timeout may be math.inf (wait as long as the holder works); on_wait() is called once, when
    the lock is found held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _still_at(fd, path):
                    break
                # Removed (remove_if_free) between our open and our lock: lock the new file.
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                continue
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"lock {path} is held by another process after {timeout:.0f} s: "
                        "wait for it to finish and try again"
                    ) from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path`."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def is_held(path: Path) -> bool:
    """Whether a process holds the lock file `path` now (a missing file: no one); creates nothing."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_if_free(path: Path, dry_run: bool = False) -> bool:
    """Delete the lock file `path` unless a process holds it (it is held while deleted, so no
    one takes it in between); whether it was deleted (dry_run: whether it would be)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _still_at(fd, path):
            return False
        if not dry_run:
            path.unlink()
        return True
    finally:
        os.close(fd)
