"""The reading plan of a streamed split: blocks of rows, their seeded order, and each lane's
segment of it, so that a data-parallel rank reads only the lanes that make up its rows
(sae_core.storage.loader reads what this plans), and whether two paired datasets can share one
plan. Plain bookkeeping: no I/O.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from sae_core.errors import DatasetDamaged
from sae_core.storage.manifests import ActivationsSplit

if TYPE_CHECKING:
    from sae_core.storage.refs import DatasetRef

BLOCK_ROWS = 8192  # rows per block of the shuffle: extraction's row group, fetched whole


class Piece(NamedTuple):
    """Consecutive rows of one shard of a split."""

    shard: int
    """The shard's index in the split's manifest."""
    start: int
    """Its first row, counted in the shard."""
    stop: int
    """One past its last row."""


class ReadTally:
    """What a reader fetched from storage (thread-safe counters, for `iter_batches(reads=)`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        """Compressed bytes of the activation column chunks read (the row groups fetched)."""
        self.rows = 0
        """Rows those row groups hold."""

    def add(self, nbytes: int, rows: int) -> None:
        with self._lock:
            self.bytes += nbytes
            self.rows += rows


def blocks(info: ActivationsSplit, block_rows: int = BLOCK_ROWS) -> list[Piece]:
    """The split cut into blocks of block_rows rows, shard by shard (a shard's last one shorter)."""
    return [
        Piece(i, start, min(start + block_rows, shard.rows))
        for i, shard in enumerate(info.shards)
        for start in range(0, shard.rows, block_rows)
    ]


def lane_slice(batch_size: int, lanes: int, lane: int) -> slice:
    """The rows lane `lane` gives each batch: lanes differ by at most one row, and when W divides
    both lanes and batch_size, rank r's `Ranks.rows` are exactly lanes [r L / W, (r + 1) L / W)."""
    return slice(lane * batch_size // lanes, (lane + 1) * batch_size // lanes)


def segment(order: list[Piece], start: int, stop: int) -> list[Piece]:
    """Rows [start, stop) of the pieces of `order` laid end to end, as pieces."""
    ends = np.cumsum([p.stop - p.start for p in order]).tolist()
    out = []
    i = bisect.bisect_right(ends, start)
    while start < stop and i < len(order):
        first = ends[i] - (order[i].stop - order[i].start)  # where piece i begins in the stream
        piece = order[i]
        lo, hi = piece.start + start - first, piece.start + min(stop, ends[i]) - first
        out.append(Piece(piece.shard, lo, hi))
        start = ends[i]
        i += 1
    return out


def epoch_lanes(
    info: ActivationsSplit, batch_size: int, lanes: int, generator: torch.Generator
) -> list[list[Piece]]:
    """Each lane's segment of an epoch: the blocks in the order `generator` draws, end to end,
    cut into `lanes` runs of `steps * rows per batch` rows (steps = rows // batch_size)."""
    cut = blocks(info)
    order = [cut[i] for i in torch.randperm(len(cut), generator=generator).tolist()]
    steps = info.rows // batch_size
    shares = [lane_slice(batch_size, lanes, lane) for lane in range(lanes)]
    return [segment(order, steps * rows.start, steps * rows.stop) for rows in shares]


def check_paired_splits(
    ref: DatasetRef,
    info: ActivationsSplit,
    other: DatasetRef,
    info_other: ActivationsSplit,
    dtype: str,
    dtype_other: str,
) -> None:
    """DatasetDamaged unless two datasets' splits can share one reading plan: the same shards
    with the same row counts in the same storage dtype, as one extraction pass writes them for
    two hooks (a transcoder's input and output)."""
    layout = [(s.name, s.rows) for s in info.shards]
    if layout != [(s.name, s.rows) for s in info_other.shards] or dtype != dtype_other:
        raise DatasetDamaged(
            f"datasets {ref.uri} and {other.uri} do not pair: their shards, row counts or "
            "dtypes differ; extract both hooks in one pass (model.hook and model.hook_out)"
        )
