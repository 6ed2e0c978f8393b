"""Injected storage faults, to exercise retries and re-runs of failed stages on purpose.

`SAEFLOW_INJECT_FAULT=PATTERN@SKIP[xCOUNT]`: writes through a store opened with `open_store`
(the training stage's: its checkpoints and outputs) whose path contains PATTERN succeed SKIP
times, then fail COUNT times (every time when COUNT is left out) with `InjectedFault`, an
OSError like those a flaky disk or S3 endpoint raises. Counts are per process, so the retries
of a task (same process) see the fault continue. Examples:
- `checkpoints/@1`: the first training checkpoint lands, every later write fails (a stage that
  fails for good until the variable is unset: "fix the cause and re-run");
- `checkpoints/@1x1`: the second checkpoint write fails once (a transient error to retry).
"""

from __future__ import annotations

import os
import re
import threading
from typing import NamedTuple

from sae_core.errors import ConfigError
from sae_core.storage.store import Store

ENV = "SAEFLOW_INJECT_FAULT"
_SPEC = re.compile(r"^(?P<pattern>[^@]+)@(?P<skip>\d+)(x(?P<count>\d+))?$")
_seen: dict[str, int] = {}
_lock = threading.Lock()


class InjectedFault(OSError):
    """A storage failure injected through SAEFLOW_INJECT_FAULT."""


class FaultPlan(NamedTuple):
    pattern: str
    skip: int
    count: int | None  # None: fail every matching write after the first `skip`

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        match = _SPEC.match(spec)
        if match is None:
            raise ConfigError(
                f"{ENV}='{spec}': expected PATTERN@SKIP or PATTERN@SKIPxCOUNT, e.g. checkpoints/@1"
            )
        count = match["count"]
        return cls(match["pattern"], int(match["skip"]), None if count is None else int(count))

    def check(self, spec: str, rel: str) -> None:
        """Count a write to `rel` and raise when the plan says this one fails."""
        if self.pattern not in rel:
            return
        with _lock:
            nth = _seen[spec] = _seen.get(spec, 0) + 1
        failing = nth > self.skip and (self.count is None or nth <= self.skip + self.count)
        if failing:
            raise InjectedFault(f"injected fault ({ENV}={spec}): write #{nth} to {rel}")


class FaultyStore(Store):
    """A Store whose writes go through the fault plan first."""

    def __init__(self, uri: str | None, spec: str):
        super().__init__(uri)
        self._spec, self._plan = spec, FaultPlan.parse(spec)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._plan.check(self._spec, rel)
        super().write_bytes(rel, data)


def open_store(uri: str | None) -> Store:
    """The store at `uri`, with the fault plan of SAEFLOW_INJECT_FAULT applied if it is set."""
    spec = os.environ.get(ENV)
    return FaultyStore(uri, spec) if spec else Store(uri)


def reset() -> None:
    """Forget the writes counted so far (a new plan starts from zero)."""
    with _lock:
        _seen.clear()
