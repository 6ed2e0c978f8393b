"""Reading activation datasets: whole splits for small work, a streaming shuffled reader for training.

`iter_batches` streams a split of any size from the store (local or S3) in `[B, d]` float32
batches, shuffled at two levels, in a way that lets each data-parallel rank read only its share:
- blocks: the split is cut into blocks of `BLOCK_ROWS` rows (extraction's row group; a shard's
  last block is shorter), and the blocks are permuted per epoch (`epoch_lanes`);
- lanes: the permuted blocks, end to end, are cut into `lanes` contiguous segments; lane l gives
  rows `lane_slice(B, lanes, l)` of every batch (B / lanes rows, give or take one) and reads
  only its own segment, `steps * its rows` long (steps = rows // B, the epoch's batches);
- tokens: each lane's rows pass through its own shuffle buffer (`buffer_tokens` shared out in
  proportion to its rows). Once the buffer is full, each round draws a random half of its slots,
  emits their rows, and refills exactly those slots with the next rows of the lane's segment;
  at the end of the segment the rest of the buffer is emitted in a random order.
Every row of the first `steps * B` of the permuted stream is emitted exactly once per epoch; the
last `rows % B` are not read. A batch depends only on (seed, epoch, lanes, buffer_tokens,
batch_size) and the dataset, never on who reads it: a rank whose `take` covers whole lanes
reads only those lanes' segments (about 1/W of the split's bytes), and W ranks' slices, in rank
order, are the very batches one process gets.

Background threads keep the trainer from waiting: one per lane reads its pieces (a local file
natively; on S3 ranged reads of the row groups it needs, the activation column only) a few row
groups ahead; another runs the lanes' buffers and cuts batches, `prefetch` batches ahead.
Memory is bounded by the buffers (in the storage dtype), the queued batches and row groups,
whatever the dataset's size. Arrow -> NumPy -> torch is zero-copy: the one copy of a row is into
a buffer, the next out of it into a batch.

Paired datasets (a transcoder's two hooks, `iter_batches(paired_with=...)`) share one plan: each
lane reads the same pieces of both and joins them row by row before its buffer.
"""

from __future__ import annotations

import errno
import warnings
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sae_core.errors import ConfigError, DatasetDamaged
from sae_core.storage.lanes import (  # noqa: F401 (loader's names)
    BLOCK_ROWS,
    Piece,
    ReadTally,
    blocks,
    check_paired_splits,
    epoch_lanes,
    lane_slice,
    segment,
)
from sae_core.storage.layout import activation_matrix
from sae_core.storage.manifests import ActivationsManifest, ActivationsSplit
from sae_core.storage.prefetch import prefetched
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

DEFAULT_BUFFER_TOKENS = 2**17  # 288 MiB of float32 rows at d=576
DEFAULT_PREFETCH = 4  # ready batches queued ahead of the trainer
_RANGE_BYTES = 8 * 2**20  # one ranged GET of a shard fetched from S3
_READ_AHEAD = 4  # row groups (8192 rows each as extraction writes them) read ahead, over all lanes
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def split_manifest(ref: DatasetRef, split: str) -> tuple[ActivationsManifest, ActivationsSplit]:
    """(the dataset's manifest, the split's entry); raises if it is not an activations split."""
    manifest = ref.manifest(ActivationsManifest)
    if split not in manifest.splits:
        raise ValueError(
            f"dataset {ref.uri} has no split {split!r}; it has {', '.join(manifest.splits)}"
        )
    return manifest, manifest.splits[split]


def _damaged(store: Store, rel: str, err: BaseException) -> BaseException:
    """A parse error, a failed page checksum or a missing file: the shard is damaged (final, named).
    An OSError with an errno (EIO, a reset connection) may pass: it is returned as it is, to retry."""
    if isinstance(err, OSError) and err.errno not in (None, errno.ENOENT):
        return err
    reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    return DatasetDamaged(
        f"shard {store.url(rel)} is damaged ({reason}); delete its dataset folder from the "
        "store and run again to recompute it",
        reason,
    )


def open_shard(store: Store, rel: str, verify: bool = False) -> pq.ParquetFile:
    """A shard ready to parse: a local file is read natively; an object on S3 is fetched whole
    with concurrent ranged GETs (one shard in memory at a time: ~2-4x s3fs's sequential reads).

    verify: check each page's CRC (extraction writes one) as it is read, so a flipped bit is
    caught. Validation verifies; the training reader does not (it makes decoding ~4x slower)."""
    path = store.path(rel)
    source: str | pa.BufferReader = path
    if store.protocol != "file":
        size = store.fs.size(path)
        starts = list(range(0, size, _RANGE_BYTES))
        ends = [min(size, start + _RANGE_BYTES) for start in starts]
        parts = store.fs.cat_ranges([path] * len(starts), starts, ends)
        source = pa.BufferReader(b"".join(parts))
    try:
        return pq.ParquetFile(source, page_checksum_verification=verify)
    except (pa.ArrowException, OSError) as err:
        raise _damaged(store, rel, err) from None


def read_shard(store: Store, rel: str) -> Iterator[pa.RecordBatch]:
    """One shard's rows as record batches, a row group at a time."""
    with open_shard(store, rel) as parquet:
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group)
            except (pa.ArrowException, OSError) as err:
                raise _damaged(store, rel, err) from None
            yield from table.to_batches()


def read_split(ref: DatasetRef, split: str) -> Iterator[pa.RecordBatch]:
    """Stream a split's rows in storage order, shard by shard, a row group at a time."""
    _, info = split_manifest(ref, split)
    store = ref.open_store()
    for shard in info.shards:
        yield from read_shard(store, f"{ref.path}/{shard.name}")


def load_split_tensor(ref: DatasetRef, split: str) -> Tensor:
    """All activations of a split as one `[N, d]` float32 tensor (N*d*4 bytes: small data only)."""
    manifest, info = split_manifest(ref, split)
    out = torch.empty(info.rows, manifest.width, dtype=torch.float32)
    view = out.numpy()
    row = 0
    for batch in read_split(ref, split):
        view[row : row + batch.num_rows] = activation_matrix(batch)
        row += batch.num_rows
    if row != info.rows:
        raise DatasetDamaged(
            f"dataset {ref.uri} split {split}: read {row} rows, manifest says {info.rows}; "
            "delete the dataset folder and run again to recompute it"
        )
    return out


def _as_tensor(rows: np.ndarray) -> Tensor:
    with warnings.catch_warnings():
        # Arrow memory is read-only; the tensor is only ever read (copied into the buffer).
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


@contextmanager
def _ranged(store: Store, rel: str) -> Iterator[pq.ParquetFile]:
    """A shard opened for reading some of its row groups: a local file natively, an object on S3
    through ranged reads (the footer, then the column chunks asked for), never fetched whole."""
    path = store.path(rel)
    try:
        if store.protocol == "file":
            with pq.ParquetFile(path) as parquet:
                yield parquet
        else:
            with (
                store.fs.open(path, "rb", cache_type="none") as raw,
                pq.ParquetFile(raw) as parquet,
            ):
                yield parquet
    except (pa.ArrowException, OSError) as err:
        raise _damaged(store, rel, err) from None


def _piece_rows(
    ref: DatasetRef, info: ActivationsSplit, pieces: list[Piece], width: int, reads: ReadTally
) -> Generator[Tensor, None, None]:
    """The rows of `pieces`, in order, as `[r, d]` tensors (a row group's share of a piece
    each): only the row groups a piece overlaps are fetched, their activation column only; each
    shard's row count and width checked against the manifest."""
    store = ref.open_store()
    for piece in pieces:
        shard = info.shards[piece.shard]
        rel = f"{ref.path}/{shard.name}"
        with _ranged(store, rel) as parquet:
            meta = parquet.metadata
            if meta.num_rows != shard.rows:
                raise DatasetDamaged(
                    f"dataset {ref.uri}: {shard.name} has {meta.num_rows} rows, the manifest "
                    f"says {shard.rows}; delete the dataset folder and run again"
                )
            columns = [
                c
                for c in range(meta.num_columns)
                if meta.schema.column(c).path.split(".")[0] == "activation"
            ]
            first = 0
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group)
                lo, hi = max(piece.start, first), min(piece.stop, first + stats.num_rows)
                if lo < hi:
                    table = parquet.read_row_group(group, columns=["activation"])
                    reads.add(
                        sum(stats.column(c).total_compressed_size for c in columns),
                        stats.num_rows,
                    )
                    rows = activation_matrix(table)
                    if rows.shape[1] != width:
                        raise DatasetDamaged(
                            f"dataset {ref.uri}: {shard.name} holds rows of width "
                            f"{rows.shape[1]}, the manifest says {width}; delete the dataset "
                            "folder and run again"
                        )
                    yield _as_tensor(rows[lo - first : hi - first])
                first += stats.num_rows


class _Side(NamedTuple):
    """A dataset a lane reads (a pair: two, input first): its split's entry and row width."""

    ref: DatasetRef
    info: ActivationsSplit
    width: int


def _paired_rows(
    sides: tuple[_Side, _Side], pieces: list[Piece], reads: ReadTally
) -> Generator[Tensor, None, None]:
    """The rows of `pieces` in two paired datasets side by side, `[r, d + d_out]`: they hold the
    same shards with the same row counts (`check_paired_splits`), so row i of one is row i of
    the other; the second's rows are cut to the first's pieces, whatever their row groups."""
    first, second = (_piece_rows(s.ref, s.info, pieces, s.width, reads) for s in sides)
    pairs = _Rows(second)
    try:
        for x in first:
            y = list(pairs.take(len(x)))
            yield torch.cat([x, y[0] if len(y) == 1 else torch.cat(y)], dim=1)
    finally:
        first.close()
        second.close()


class _Rows:
    """A stream of row pieces handed out `take(n)` rows at a time."""

    def __init__(self, pieces: Iterator[Tensor]):
        self.pieces = pieces
        self.head: Tensor | None = None

    def take(self, n: int) -> Iterator[Tensor]:
        """Up to n rows, as consecutive `[r, d]` pieces; fewer only at the end of the stream."""
        while n > 0:
            piece = self.head if self.head is not None else next(self.pieces, None)
            if piece is None:
                return
            self.head = piece[n:] if len(piece) > n else None
            piece = piece[:n]
            n -= len(piece)
            yield piece


class _Plan(NamedTuple):
    """How one lane's rows become its share of every batch."""

    width: int
    """d: values per row (a pair's: d + d_out)."""
    dtype: str
    """The stored dtype, which the shuffle buffer holds."""
    batch_size: int
    """Rows the lane gives each batch."""
    generator: torch.Generator
    """The lane's own, seeded from (seed, epoch): draws every round of its buffer."""
    buffer_tokens: int
    """The lane's shuffle buffer's size (see iter_batches)."""
    start_batch: int
    """Batches of the epoch skipped: read, not copied out."""
    take: slice
    """The rows of the lane's share copied out."""


def _lane(
    sides: tuple[_Side, ...],
    pieces: list[Piece],
    plan: _Plan,
    read_ahead: int,
    reads: ReadTally,
) -> Generator[Tensor, None, None]:
    """One lane's shares of the batches from `plan.start_batch` on: its pieces, read in their own
    thread a few row groups ahead (S3 transfers and decoding overlap the shuffling), through its
    shuffle buffer. A pair's rows are joined before the buffer, so they stay together."""
    if len(sides) == 1:
        ref, info, width = sides[0]
        read = _piece_rows(ref, info, pieces, width, reads)
    else:
        read = _paired_rows(sides, pieces, reads)
    rows = prefetched(read, read_ahead)
    try:
        yield from _shuffle_buffer(_Rows(rows), plan)
    finally:
        rows.close()


def _shuffled(
    sides: tuple[_Side, ...],
    dtype: str,
    batch_size: int,
    lanes: int,
    generator: torch.Generator,
    buffer_tokens: int,
    start_batch: int,
    take: slice,
    reads: ReadTally,
) -> Generator[Tensor, None, None]:
    """The batches from `start_batch` on, only their rows `take`: the lanes `take` overlaps
    run side by side and each batch is their shares, in lane order (the others are not read).
    sides: one dataset, or a pair laid out alike (one plan, cut from the first's split)."""
    segments = epoch_lanes(sides[0].info, batch_size, lanes, generator)
    # Every lane's seed is drawn, whichever lanes run here: a lane's rows never depend on W.
    seeds = torch.randint(2**62, (lanes,), generator=generator).tolist()
    first, stop, _ = take.indices(batch_size)
    streams = []
    for lane in range(lanes):
        rows = lane_slice(batch_size, lanes, lane)
        if max(first, rows.start) >= min(stop, rows.stop):
            continue  # none of this lane's rows are wanted here
        share = slice(max(first - rows.start, 0), min(stop, rows.stop) - rows.start)
        plan = _Plan(
            sum(side.width for side in sides),
            dtype,
            rows.stop - rows.start,
            torch.Generator().manual_seed(seeds[lane]),
            buffer_tokens * (rows.stop - rows.start) // batch_size,
            start_batch,
            share,
        )
        streams.append((segments[lane], plan))
    read_ahead = max(1, _READ_AHEAD // max(1, len(streams)))
    lanes_here = [_lane(sides, pieces, plan, read_ahead, reads) for pieces, plan in streams]
    try:
        for shares in zip(*lanes_here, strict=True):
            yield shares[0] if len(shares) == 1 else torch.cat(shares)
    finally:
        for stream in lanes_here:
            stream.close()


def _shuffle_buffer(rows: _Rows, plan: _Plan) -> Generator[Tensor, None, None]:
    """The shuffle-buffer algorithm of the module docstring; batches from `plan.start_batch` on,
    only their rows `plan.take` copied out."""
    batch_size, generator, take = plan.batch_size, plan.generator, plan.take
    per_round = max(1, plan.buffer_tokens // (2 * batch_size)) * batch_size
    buf = torch.empty(2 * per_round, plan.width, dtype=_TORCH_DTYPES[plan.dtype])  # [cap, d]

    def fill(slots: Tensor) -> int:
        """Copy the next rows of the stream into `slots` (in order); how many arrived."""
        done = 0
        for piece in rows.take(len(slots)):
            buf.index_copy_(0, slots[done : done + len(piece)], piece)
            done += len(piece)
        return done

    emitted = 0
    filled = fill(torch.arange(len(buf)))
    while filled == len(buf):
        slots = torch.randperm(len(buf), generator=generator)[:per_round]
        for b in range(0, per_round, batch_size):
            chosen = slots[b : b + batch_size]
            if emitted >= plan.start_batch:
                yield buf.index_select(0, chosen[take]).float()
            emitted += 1
            # Refill the emitted rows' slots now (not at the round's end), so the wait spreads.
            filled += fill(chosen) - len(chosen)
        if filled < len(buf):  # the stream ended during this round: some slots stay empty
            holes = torch.zeros(len(buf), dtype=torch.bool)
            holes[slots[filled - len(buf) + per_round :]] = True
            rest = torch.nonzero(~holes).squeeze(1)
            break
    else:
        rest = torch.arange(filled)
    rest = rest[torch.randperm(len(rest), generator=generator)]
    for b in range(0, len(rest) - batch_size + 1, batch_size):
        if emitted >= plan.start_batch:
            yield buf.index_select(0, rest[b : b + batch_size][take]).float()
        emitted += 1


def iter_batches(
    ref: DatasetRef,
    split: str,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    *,
    buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
    prefetch: int = DEFAULT_PREFETCH,
    take: slice | None = None,
    lanes: int = 1,
    pin_memory: bool = False,
    reads: ReadTally | None = None,
    paired_with: DatasetRef | None = None,
) -> Iterator[Tensor]:
    """Shuffled `[batch_size, d]` float32 batches of a split, streamed (see the module docstring).

    The order depends only on (seed, epoch, lanes, buffer_tokens, batch_size) and the dataset:
    the same arguments give the same batches, and `start_batch` skips the first batches of an
    epoch (to resume training mid-epoch) without changing the rest. Skipping reads the skipped
    rows (a buffer's state depends on them) but does not copy them into batches. Lane l's
    buffer holds `max(buffer_tokens * b_l / batch_size, 2 * b_l)` rows, rounded down to a
    multiple of 2 * b_l (b_l: the rows it gives each batch).

    take: yield only these rows of every batch (a data-parallel rank's slice, so W ranks with
    the same arguments split the very batches one process would get). Only the lanes `take`
    overlaps are read and buffered: with W dividing `lanes`, a rank's `Ranks.rows` are whole
    lanes, and it reads about 1/W of the split.

    lanes: the independent streams each batch is drawn from (module docstring); part of the
    order, so a run and its resumption must agree on it.

    pin_memory: page-lock each batch in the loader thread (for a CUDA trainer: its copy to the
    GPU, `non_blocking`, then overlaps the previous step instead of waiting on a staging copy).

    reads: counts what this stream fetches from storage (bytes and rows of the row groups).

    paired_with: a dataset extracted in the same pass as `ref` at another hook (a transcoder's
    output): each row is then `ref`'s row and its pair side by side, `[batch_size, d + d_out]`,
    through one plan (the same blocks, lanes and buffer draws as `ref` alone: the first d
    columns are the batches `ref` alone gives). Their shards must match row for row
    (`check_paired_splits`; the token keys themselves are checked by `sae_core.data.pairing`).
    """
    manifest, info = split_manifest(ref, split)
    if batch_size > info.rows:
        raise ConfigError(
            f"train.batch_size={batch_size} exceeds the {info.rows} rows of split '{split}' "
            f"of {ref.uri}; lower it or raise data.train_tokens"
        )
    if lanes < 1:
        raise ValueError(f"lanes={lanes}: give at least 1")
    sides = [_Side(ref, info, manifest.width)]
    if paired_with is not None:
        manifest_out, info_out = split_manifest(paired_with, split)
        check_paired_splits(ref, info, paired_with, info_out, manifest.dtype, manifest_out.dtype)
        sides.append(_Side(paired_with, info_out, manifest_out.width))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = _shuffled(
        tuple(sides),
        manifest.dtype,
        batch_size,
        lanes,
        generator,
        buffer_tokens,
        start_batch,
        take or slice(None),
        reads or ReadTally(),
    )
    if pin_memory:
        batches = (batch.pin_memory() for batch in batches)
    return prefetched(batches, prefetch)
