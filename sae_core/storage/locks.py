"""An exclusive lock between processes that share saeflow's state directory.

`fcntl.flock` on a lock file: the kernel releases it when its holder exits or crashes, so a
killed process never leaves a stale lock behind (an O_EXCL marker file would).
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
                break
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
