"""`saeflow` in a subprocess with faults armed from its environment, for the reliability tests.

usage: python tests/helpers/pipeline_worker.py SAEFLOW_ARGS...

- RELIABILITY_KILL: comma-separated kill points; the first one reached SIGKILLs this process:
  - write:PATTERN@N: right after the Nth store write whose path contains PATTERN (that write
    landed; nothing after it did);
  - torn:PATTERN@N: in the Nth such write, leaving half of its bytes in a temporary file beside
    the target, as a local write cut short by a kill leaves them;
  - call:MODULE:ATTR@N: on entering the Nth call of MODULE.ATTR (ATTR may be Class.method).
- RELIABILITY_KILLED=FILE: the kill point that fired is written to FILE first.
- RELIABILITY_SIGNAL=PATTERN:FILE: create FILE at the first store write whose path contains
  PATTERN, then go on (the test stops a server at that moment).
- RELIABILITY_SLOW=PATTERN:SECONDS: sleep before each store write whose path contains PATTERN.
- RELIABILITY_WRITES=FILE: append the path of every store write to FILE (one line each).

A SIGKILL runs no handler, `finally` or atexit: the store, the registry and Prefect see exactly
what a crash or an OOM kill leaves.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_core.storage.store import Store

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _nth(key: str) -> int:
    """How many times `key` has been seen, this time included (writes come from several threads)."""
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        return _counts[key]


def _die(spec: str) -> None:
    if killed := os.environ.get("RELIABILITY_KILLED"):
        Path(killed).write_text(spec)
    os.kill(os.getpid(), signal.SIGKILL)


def _split(spec: str) -> tuple[str, int]:
    target, _, nth = spec.rpartition("@")
    return target, int(nth)


def _arm_writes(kills: list[str], signal_spec: str, slow: str, log: str) -> None:
    points = [(spec, spec.partition(":")[0], *_split(spec.partition(":")[2])) for spec in kills]
    signal_pattern, _, signal_file = signal_spec.partition(":")
    slow_pattern, _, seconds = slow.partition(":")
    original = Store.write_bytes

    def write_bytes(self: Store, rel: str, data: bytes | memoryview) -> None:
        if log:
            with _lock, open(log, "a") as fh:
                fh.write(f"{rel}\n")
        if slow_pattern and slow_pattern in rel:
            time.sleep(float(seconds))
        if signal_pattern and signal_pattern in rel and not Path(signal_file).exists():
            Path(signal_file).touch()
        fired = next((p for p in points if p[2] in rel and _nth(p[0]) == p[3]), None)
        if fired is not None and fired[1] == "torn":
            if self.protocol == "file":
                torn = Path(f"{self.path(rel)}.tmp-torn")
                torn.parent.mkdir(parents=True, exist_ok=True)
                torn.write_bytes(bytes(data)[: len(data) // 2])
            _die(fired[0])
        original(self, rel, data)
        if fired is not None:
            _die(fired[0])

    Store.write_bytes = write_bytes  # type: ignore[method-assign]


def _arm_call(spec: str) -> None:
    target, nth = _split(spec.removeprefix("call:"))
    module_name, _, attr = target.partition(":")
    *parents, name = attr.split(".")
    owner: Any = importlib.import_module(module_name)
    for part in parents:
        owner = getattr(owner, part)
    original: Callable[..., Any] = getattr(owner, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        if _nth(spec) == nth:
            _die(spec)
        return original(*args, **kwargs)

    setattr(owner, name, call)


def main(args: list[str]) -> None:
    env = os.environ
    kills = [spec for spec in env.get("RELIABILITY_KILL", "").split(",") if spec]
    _arm_writes(
        [k for k in kills if k.startswith(("write:", "torn:"))],
        env.get("RELIABILITY_SIGNAL", ""),
        env.get("RELIABILITY_SLOW", ""),
        env.get("RELIABILITY_WRITES", ""),
    )
    for spec in kills:
        if spec.startswith("call:"):
            _arm_call(spec)
    from flows.cli import main as saeflow

    sys.argv = ["saeflow", *args]
    saeflow()


if __name__ == "__main__":
    main(sys.argv[1:])
