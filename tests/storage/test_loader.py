"""The streaming shuffled reader: exact accounting, determinism, resume, bounded reading."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from sae_core.errors import ConfigError, DatasetDamaged
from sae_core.sae.ranks import Ranks
from sae_core.storage import loader
from sae_core.storage.layout import ACTIVATION_SCHEMA, read_activations
from sae_core.storage.loader import iter_batches, load_split_tensor
from sae_core.storage.manifests import ActivationsManifest, ActivationsShard, ActivationsSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tests.helpers.activations import write_shard_table

D = 4


def write_indexed(
    root, sizes: list[int], dtype: str = "float32", row_group: int = 64
) -> DatasetRef:
    """A train split whose row i holds [i, i, i, i] (exact in float16 up to 2048), in shards."""
    store = Store(str(root))
    shards, start = [], 0
    with store.writing("acts") as w:
        for i, rows in enumerate(sizes):
            values = np.repeat(np.arange(start, start + rows), D).astype(dtype)
            table = pa.table(
                {
                    "activation": pa.FixedSizeListArray.from_arrays(pa.array(values), D),
                    "sequence": pa.array(np.arange(start, start + rows), pa.int64()),
                    "position": pa.array(np.ones(rows), pa.int32()),
                    "token_id": pa.array(np.zeros(rows), pa.int32()),
                },
                schema=ACTIVATION_SCHEMA(D, dtype),
            )
            name = f"train/shard-{i:05d}.parquet"
            x = values.reshape(rows, D)
            shards.append(write_shard_table(w, name, name, table, x, row_group_size=row_group))
            start += rows
        w.manifest = ActivationsManifest(
            schema_version=1,
            width=D,
            dtype=dtype,
            splits={"train": ActivationsSplit(rows=start, shards=shards)},
        )
    return DatasetRef(store=store.uri, path="acts", fingerprint="acts", rows=start)


def row_ids(batches: list[torch.Tensor]) -> list[int]:
    x = torch.cat(batches)
    assert torch.equal(x, x[:, :1].expand(-1, D))  # rows arrive whole
    return x[:, 0].long().tolist()


@pytest.mark.parametrize("buffer_tokens", [64, 200, 10**6])
@pytest.mark.parametrize("batch_size", [16, 50])
@pytest.mark.parametrize("lanes", [1, 3])
def test_each_row_once_per_epoch(tmp_path, buffer_tokens, batch_size, lanes):
    ref = write_indexed(tmp_path, [300, 250, 7, 443])
    batches = list(
        iter_batches(ref, "train", batch_size, seed=1, buffer_tokens=buffer_tokens, lanes=lanes)
    )
    assert len(batches) == 1000 // batch_size
    assert all(b.shape == (batch_size, D) and b.dtype == torch.float32 for b in batches)
    ids = row_ids(batches)
    assert len(set(ids)) == len(ids) == 1000 // batch_size * batch_size
    assert ids != sorted(ids)


def test_deterministic_resumable_and_new_order_each_epoch(tmp_path):
    ref = write_indexed(tmp_path, [300, 300, 400])
    first = list(iter_batches(ref, "train", 32, seed=3, buffer_tokens=128))
    again = list(iter_batches(ref, "train", 32, seed=3, buffer_tokens=128))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    resumed = list(iter_batches(ref, "train", 32, seed=3, start_batch=11, buffer_tokens=128))
    assert all(torch.equal(a, b) for a, b in zip(first[11:], resumed, strict=True))
    epoch1 = list(iter_batches(ref, "train", 32, seed=3, epoch=1, buffer_tokens=128))
    assert row_ids(epoch1) != row_ids(first)


@pytest.mark.parametrize("start_batch", [0, 7])
@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_ranks_slices_are_the_very_batches_one_reader_gets(tmp_path, start_batch, world_size):
    """Data parallel: rank r's `take` of every batch; the W slices, in rank order, are the
    batches of one reader (the end of the epoch, after the buffers drain, included)."""
    ref = write_indexed(tmp_path, [300, 250, 7, 443])
    common = {"seed": 2, "start_batch": start_batch, "buffer_tokens": 200, "lanes": 6}
    whole = list(iter_batches(ref, "train", 48, **common))
    per_rank = 48 // world_size
    parts = [
        list(iter_batches(ref, "train", 48, take=slice(r * per_rank, (r + 1) * per_rank), **common))
        for r in range(world_size)
    ]
    assert len(whole) == 1000 // 48 - start_batch
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([part[b] for part in parts]), batch)


def _rows_read(ref: DatasetRef, **args) -> tuple[int, int]:
    """(rows, bytes) an epoch of iter_batches(ref, "train", 64, seed=5, **args) fetches."""
    reads = loader.ReadTally()
    list(iter_batches(ref, "train", 64, seed=5, reads=reads, **args))
    return reads.rows, reads.bytes


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_only_its_lanes(tmp_path, world_size):
    """Rows and bytes fetched per rank fall from the whole split (what every rank read before
    lanes) to about 1/W of it: a piece's ends cut row groups, and the row groups they cut are
    fetched whole (at most 2 per piece; here a lane's segment spans at most 4 pieces)."""
    ref = write_indexed(tmp_path, [2000, 1500, 7, 2493], row_group=32)
    whole_rows, whole_bytes = _rows_read(ref)
    assert 6000 - 64 <= whole_rows <= 6000  # one reader: the split (but the unused last rows)
    per_rank = 64 // world_size
    for r in range(world_size):
        mine = slice(r * per_rank, (r + 1) * per_rank)
        rows, nbytes = _rows_read(ref, lanes=4, take=mine)
        print(
            f"rank {r} of {world_size}: {nbytes} of {whole_bytes} bytes ({nbytes / whole_bytes:.3f})"
        )
        lanes_here = 4 // world_size
        assert (
            6000 // 64 * 64 / world_size
            <= rows
            <= whole_rows / world_size + lanes_here * 4 * 2 * 32
        )
        assert nbytes <= whole_bytes / world_size * 1.2


def test_lanes_cut_the_permuted_blocks_into_contiguous_disjoint_segments():
    info = ActivationsSplit(
        rows=sum(sizes := [20_000, 5, 9000]),
        shards=[
            ActivationsShard(name=f"s{i}", rows=n, bytes=1, norm_sum=0.0, norm_max=0.0)
            for i, n in enumerate(sizes)
        ],
    )
    assert [p.stop - p.start for p in loader.blocks(info)] == [8192, 8192, 3616, 5, 8192, 808]
    lanes, batch = 5, 1001
    segments = loader.epoch_lanes(info, batch, lanes, torch.Generator().manual_seed(0))
    steps = info.rows // batch
    seen: set[tuple[int, int]] = set()
    for lane, pieces in enumerate(segments):
        share = loader.lane_slice(batch, lanes, lane)
        assert sum(p.stop - p.start for p in pieces) == steps * (share.stop - share.start)
        rows = {(p.shard, i) for p in pieces for i in range(p.start, p.stop)}
        assert not rows & seen
        seen |= rows
    assert len(seen) == steps * batch
    # Whole lanes make each rank's equal slice of a batch, whatever W divides the lanes.
    for world in (1, 2, 4):
        for rank in range(world):
            first, last = rank * 8 // world, (rank + 1) * 8 // world - 1
            mine = (loader.lane_slice(64, 8, first).start, loader.lane_slice(64, 8, last).stop)
            assert mine == (Ranks(rank, world).rows(64).start, Ranks(rank, world).rows(64).stop)


def test_small_buffer_still_mixes_shards(tmp_path):
    ref = write_indexed(tmp_path, [250] * 4)
    orders = set()
    for seed in range(4):
        ids = row_ids(list(iter_batches(ref, "train", 25, seed=seed, buffer_tokens=100)))
        shards = [i // 250 for i in ids]
        orders.add(tuple(dict.fromkeys(shards)))  # the order shards first appear in
        # Neighbouring shards meet in the buffer: some batches hold rows of two.
        assert any(len(set(shards[b : b + 25])) > 1 for b in range(0, len(shards), 25))
    assert len(orders) > 1


def test_float16_storage_comes_out_float32(tmp_path):
    ref = write_indexed(tmp_path, [100, 100], dtype="float16")
    batches = list(iter_batches(ref, "train", 20, seed=0, buffer_tokens=60))
    assert batches[0].dtype == torch.float32
    assert sorted(row_ids(batches)) == list(range(200))
    assert load_split_tensor(ref, "train")[:, 0].tolist() == list(range(200))
    rows = read_activations(tmp_path / "acts" / "train" / "shard-00001.parquet")
    assert rows.dtype == np.float32 and rows[:, 0].tolist() == list(range(100, 200))


def test_reading_is_bounded_by_the_buffer(tmp_path):
    ref = write_indexed(tmp_path, [512] * 8, row_group=32)
    reads = loader.ReadTally()
    stream = iter_batches(ref, "train", 16, seed=0, buffer_tokens=128, prefetch=2, reads=reads)
    next(stream)
    time.sleep(0.2)  # the loader threads read ahead as far as they may
    # Buffer (128) + the refills behind the queued batches (prefetch 2 + 1 in hand) + the row
    # groups read ahead (4 queued, 1 in hand, 1 being split).
    assert 128 <= reads.rows <= 128 + 3 * 16 + 6 * 32
    stream.close()


def test_closing_the_stream_stops_its_thread(tmp_path):
    ref = write_indexed(tmp_path, [1000])
    stream = iter_batches(ref, "train", 10, seed=0, buffer_tokens=40, prefetch=1)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "activation-loader"]


def test_errors(tmp_path):
    ref = write_indexed(tmp_path, [100, 100])
    with pytest.raises(ConfigError, match=r"train\.batch_size=500 exceeds the 200 rows"):
        iter_batches(ref, "train", 500, seed=0)
    store = Store(str(tmp_path))
    manifest = store.read_json("acts/_MANIFEST.json")
    manifest["splits"]["train"]["shards"][1]["rows"] = 90
    store.write_json("acts/_MANIFEST.json", manifest)
    with pytest.raises(
        DatasetDamaged, match="shard-00001.parquet has 100 rows, the manifest says 90"
    ):
        list(iter_batches(ref, "train", 10, seed=0, buffer_tokens=40))
