"""A damaged activation shard (a flipped byte, a truncation, an injected NaN, the wrong width,
a missing file): validation, or the training reader, stops with a message naming the shard,
and nothing is trained or registered on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_core.errors import DatasetDamaged, ValidationFailed
from sae_core.stages import train as train_stage
from sae_core.storage.layout import STORAGE_SCHEMA, activation_matrix, storage_batch
from sae_core.storage.store import Store
from tasks.validate import validate_activations
from tests.reliability.conftest import committed, error_line

SHARD = "train/shard-00002.parquet"
VOCAB = 512  # the tiny model's


def flip_a_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # in the middle of the float data
    shard.write_bytes(bytes(data))


def truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-300])


def rewrite(shard: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Write the shard again, whole and valid, with `change` applied to its [rows, d] floats:
    what a producer with a bug would commit."""
    table = pq.read_table(shard)
    x = change(activation_matrix(table).copy())
    columns = {name: table.column(name).to_numpy() for name in ("sequence", "position", "token_id")}
    batch = storage_batch({"activation": x, **columns}, STORAGE_SCHEMA(x.shape[1], "float32"))
    pq.write_table(pa.Table.from_batches([batch]), shard, write_page_checksum=True)


def inject_nan(shard: Path) -> None:
    def change(x: np.ndarray) -> np.ndarray:
        x[7, 3] = np.nan
        return x

    rewrite(shard, change)


def narrow(shard: Path) -> None:
    rewrite(shard, lambda x: x[:, :-4])


def remove(shard: Path) -> None:
    shard.unlink()


DAMAGE = {
    "flipped-byte": (flip_a_byte, "unreadable"),
    "truncated": (truncate, "unreadable"),
    "injected-nan": (inject_nan, "no NaN/inf values: 1 of 496 rows"),
    "wrong-width": (narrow, "width 64 as in manifest: observed 60"),
    "missing": (remove, "unreadable"),
}


@pytest.mark.parametrize("damage, finding", DAMAGE.values(), ids=DAMAGE.keys())
def test_validation_names_the_damaged_shard(damage, finding, copied_store):
    folder, _, acts = copied_store
    damage(folder / acts.path / SHARD)
    with pytest.raises(ValidationFailed) as info:
        validate_activations.fn(acts, VOCAB, progress=False)
    message = str(info.value)
    assert f"{SHARD}: {finding}" in message, message
    assert "(1 of 9 shards)" in message.splitlines()[0], message


@pytest.mark.parametrize(
    "damage", [truncate, remove, narrow], ids=["truncated", "missing", "wrong-width"]
)
def test_the_training_reader_names_the_damaged_shard_and_commits_no_sae(
    damage, copied_store, tiny_config
):
    """Damage after validation (the reader skips CRC checks for speed: flips are validation's)."""
    folder, _, acts = copied_store
    damage(folder / acts.path / SHARD)
    with pytest.raises(DatasetDamaged, match=SHARD):
        train_stage.train_sae(acts, tiny_config.sae, tiny_config.train, progress=False)
    assert not [path for path in committed(Store(str(folder))) if path.startswith("sae/")]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_a_byte, inject_nan], ids=["flipped-byte", "injected-nan"])
def test_the_pipeline_stops_at_validation_and_trains_nothing(
    damage, copied_store, prefect, new_workspace
):
    """Through the CLI: the run ends on one line naming the shard; no SAE, no registered model."""
    folder, _, acts = copied_store
    damage(folder / acts.path / SHARD)
    ws = new_workspace("ws", store=str(folder))
    result = ws.invoke(*ws.args())
    assert result.exit_code == 2, result.output
    # The failure's first line, then one line per damaged shard and the data docs' address.
    assert "failed validation (1 of 9 shards)" in error_line(result.output)
    assert f"  {SHARD}: " in result.output
    assert not [path for path in committed(Store(ws.store)) if path.startswith("sae/")]
    assert ws.versions() == []
