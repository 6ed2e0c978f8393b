"""Reading activation datasets: whole splits for small work, a streaming shuffled reader for training.

`iter_batches` streams a split of any size from the store (local or S3) in `[B, d]` float32
batches, shuffled at two levels:
- shard order: a permutation of the split's shards, drawn per epoch;
- tokens: a shuffle buffer of `buffer_tokens` rows. Once the buffer is full, each round draws a
  random half of its slots, emits their rows as batches, and refills exactly those slots with the
  next rows of the stream; at the end of the stream the rest of the buffer is emitted in a random
  order. Every row of the split is emitted exactly once per epoch, except the last
  `rows % batch_size`, which are dropped (so an epoch is `rows // batch_size` batches).

Two background threads keep the trainer from waiting: one reads shards (a local file natively;
an S3 object whole, with concurrent ranged GETs) and decodes them a few row groups ahead; the
other refills the buffer and cuts batches, `prefetch` batches ahead. Memory is bounded by the
buffer (in the storage dtype), the queued batches and row groups, and one shard in flight from S3,
whatever the dataset's size. Arrow -> NumPy -> torch is zero-copy: the one copy of a row is into
the buffer, the next out of it into a batch.
"""

from __future__ import annotations

import errno
import queue
import threading
import warnings
from collections.abc import Generator, Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sae_core.errors import ConfigError, DatasetDamaged
from sae_core.storage.layout import activation_matrix
from sae_core.storage.manifests import ActivationsManifest, ActivationsShard, ActivationsSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

DEFAULT_BUFFER_TOKENS = 2**17  # 288 MiB of float32 rows at d=576
DEFAULT_PREFETCH = 4  # ready batches queued ahead of the trainer
_RANGE_BYTES = 8 * 2**20  # one ranged GET of a shard fetched from S3
_READ_AHEAD = 4  # row groups (8192 rows each as extraction writes them) read ahead of the buffer
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


def check_paired_splits(
    ref: DatasetRef,
    info: ActivationsSplit,
    other: DatasetRef,
    info_other: ActivationsSplit,
    dtype: str,
    dtype_other: str,
) -> None:
    """DatasetDamaged unless two datasets' splits hold the same shards with the same row counts
    in the same storage dtype, as one extraction pass writes them for two hooks."""
    layout = [(s.name, s.rows) for s in info.shards]
    if layout != [(s.name, s.rows) for s in info_other.shards] or dtype != dtype_other:
        raise DatasetDamaged(
            f"datasets {ref.uri} and {other.uri} do not pair: their shards, row counts or "
            "dtypes differ; extract both hooks in one pass (model.hook and model.hook_out)"
        )


def _as_tensor(rows: np.ndarray) -> Tensor:
    with warnings.catch_warnings():
        # Arrow memory is read-only; the tensor is only ever read (copied into the buffer).
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def _shard_rows(
    ref: DatasetRef, shards: list[ActivationsShard], width: int
) -> Generator[Tensor, None, None]:
    """The rows of `shards`, in that order, as `[r, d]` tensors (one per row group), each shard's
    row count and width checked against the manifest."""
    store = ref.open_store()
    for shard in shards:
        seen = 0
        for batch in read_shard(store, f"{ref.path}/{shard.name}"):
            seen += batch.num_rows
            rows = activation_matrix(batch)
            if rows.shape[1] != width:
                raise DatasetDamaged(
                    f"dataset {ref.uri}: {shard.name} holds rows of width {rows.shape[1]}, "
                    f"the manifest says {width}; delete the dataset folder and run again"
                )
            yield _as_tensor(rows)
        if seen != shard.rows:
            raise DatasetDamaged(
                f"dataset {ref.uri}: {shard.name} has {seen} rows, the manifest says "
                f"{shard.rows}; delete the dataset folder and run again"
            )


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
    """How a split's rows become batches: iter_batches' arguments, resolved."""

    width: int
    """d: values per row."""
    dtype: str
    """The stored dtype, which the shuffle buffer holds."""
    batch_size: int
    """Rows per batch."""
    generator: torch.Generator
    """Seeded by (seed, epoch): draws the shard order and every round of the buffer."""
    buffer_tokens: int
    """The shuffle buffer's size (see iter_batches)."""
    start_batch: int
    """Batches of the epoch skipped: read, not copied out."""
    take: slice
    """The rows of each batch copied out."""


def _paired_rows(
    refs: tuple[DatasetRef, DatasetRef],
    shards: tuple[list[ActivationsShard], ...],
    widths: tuple[int, int],
) -> Generator[Tensor, None, None]:
    """The rows of two paired datasets' shards side by side, `[r, d_in + d_out]` per row group
    (one copy): both were written by one extraction pass, so their row groups align."""
    sides = [_shard_rows(ref, s, w) for ref, s, w in zip(refs, shards, widths, strict=True)]
    try:
        for x in sides[0]:
            y = next(sides[1], None)
            if y is None or len(y) != len(x):
                raise DatasetDamaged(
                    f"datasets {refs[0].uri} and {refs[1].uri} do not pair: their row groups "
                    "differ; extract both hooks in one pass (model.hook and model.hook_out)"
                )
            yield torch.cat([x, y], dim=1)
    finally:
        for side in sides:
            side.close()


def _shuffled(
    ref: DatasetRef,
    info: ActivationsSplit,
    plan: _Plan,
    paired: tuple[DatasetRef, ActivationsSplit, int] | None = None,
) -> Generator[Tensor, None, None]:
    """The split's batches from `plan.start_batch` on: shards in a shuffled order, read in their
    own thread a few row groups ahead (S3 transfers and decoding overlap the shuffling), through
    the shuffle buffer. paired: (ref, split, width) of a dataset whose rows join each row's."""
    order = torch.randperm(len(info.shards), generator=plan.generator).tolist()
    shards = [info.shards[i] for i in order]
    if paired is None:
        rows = _shard_rows(ref, shards, plan.width)
    else:
        ref_out, info_out, width_out = paired
        shards_out = [info_out.shards[i] for i in order]
        width_in = plan.width - width_out
        rows = _paired_rows((ref, ref_out), (shards, shards_out), (width_in, width_out))
    pieces = _prefetched(rows, _READ_AHEAD)
    try:
        yield from _shuffle_buffer(_Rows(pieces), plan)
    finally:
        pieces.close()


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


def _prefetched(items: Generator[Tensor, None, None], depth: int) -> Generator[Tensor, None, None]:
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
    pin_memory: bool = False,
    paired_with: DatasetRef | None = None,
) -> Iterator[Tensor]:
    """Shuffled `[batch_size, d]` float32 batches of a split, streamed (see the module docstring).

    The order depends only on (seed, epoch, buffer_tokens, batch_size) and the dataset: the same
    arguments give the same batches, and `start_batch` skips the first batches of an epoch (to
    resume training mid-epoch) without changing the rest. Skipping reads the skipped rows (the
    buffer's state depends on them) but does not copy them into batches. The buffer holds
    `max(buffer_tokens, 2 * batch_size)` rows, rounded down to a multiple of 2 * batch_size.

    take: yield only these rows of every batch (a data-parallel rank's slice, so W ranks with
    the same arguments split the very batches one process would get). Each rank still reads
    and buffers the whole split (the buffer's state depends on every row); only the copy
    into batches shrinks.

    pin_memory: page-lock each batch in the loader thread (for a CUDA trainer: its copy to the
    GPU, `non_blocking`, then overlaps the previous step instead of waiting on a staging copy).

    paired_with: a dataset extracted in the same pass as `ref` at another hook (a transcoder's
    output): each row is then `ref`'s row and its pair side by side, `[batch_size, d + d_out]`,
    shuffled together. Their shards must match row for row (`check_paired_splits`; the token
    keys themselves are checked by `sae_core.data.pairing`).
    """
    manifest, info = split_manifest(ref, split)
    if batch_size > info.rows:
        raise ConfigError(
            f"train.batch_size={batch_size} exceeds the {info.rows} rows of split '{split}' "
            f"of {ref.uri}; lower it or raise data.train_tokens"
        )
    width, joined = manifest.width, None
    if paired_with is not None:
        manifest_out, info_out = split_manifest(paired_with, split)
        check_paired_splits(ref, info, paired_with, info_out, manifest.dtype, manifest_out.dtype)
        width, joined = width + manifest_out.width, (paired_with, info_out, manifest_out.width)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    plan = _Plan(
        width,
        manifest.dtype,
        batch_size,
        generator,
        buffer_tokens,
        start_batch,
        take or slice(None),
    )
    batches = _shuffled(ref, info, plan, joined)
    if pin_memory:
        batches = (batch.pin_memory() for batch in batches)
    return _prefetched(batches, prefetch)
