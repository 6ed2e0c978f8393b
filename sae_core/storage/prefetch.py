"""A generator run in a background thread a few items ahead of its consumer: the loader's last
stage, so the trainer never waits on shuffling and batch cutting."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator
from typing import Any

from torch import Tensor


def prefetched(items: Generator[Tensor, None, None], depth: int) -> Generator[Tensor, None, None]:
    """Run `items` in a background thread, `depth` ready items ahead; errors re-raise here."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        """Queue an item unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)
        finally:
            items.close()  # releases what it holds open (a shard, an inner reader)

    thread = threading.Thread(target=produce, name="activation-loader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(0.05)
