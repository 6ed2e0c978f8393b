"""What every benchmark records beside its figures: wall seconds of a call, the machine's load."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of `fn()`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> float:
    """The one-minute load average: a figure taken under load says so."""
    return round(os.getloadavg()[0], 2)
