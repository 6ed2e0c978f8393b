"""The synthetic activations dataset the loading and group benchmarks write and read."""

from __future__ import annotations

import numpy as np

from sae_core.config import DataConfig
from sae_core.data.activations import shard_rows, write_shard
from sae_core.storage.layout import STORAGE_SCHEMA
from sae_core.storage.manifests import ActivationsManifest, ActivationsSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store


def write_synthetic(
    store: Store, path: str, rows: int, width: int, dtype: str, shard_mb: float, seed: int = 0
) -> DatasetRef:
    """A committed activations dataset of `rows` Gaussian rows (train split; eval: 1 shard of
    1024), written as the extraction writes shards. Memory: one shard at a time."""
    rng = np.random.default_rng(seed)
    per_shard = shard_rows(DataConfig(shard_mb=shard_mb), width, dtype)
    schema = STORAGE_SCHEMA(width, dtype)
    splits = {}
    with store.writing(path) as writer:
        for split, n in (("train", rows), ("eval", 1024)):
            shards = []
            for index, start in enumerate(range(0, n, per_shard)):
                m = min(per_shard, n - start)
                x = rng.standard_normal((m, width), dtype=np.float32)
                columns = {
                    "activation": x.astype(dtype, copy=False),
                    "sequence": np.arange(start, start + m, dtype=np.int64),
                    "position": np.ones(m, np.int32),
                    "token_id": np.zeros(m, np.int32),
                    "norm": np.linalg.norm(x, axis=1),
                }
                name = f"{split}/shard-{index:05d}.parquet"
                shards.append(write_shard(writer, name, [columns], schema))
            splits[split] = ActivationsSplit(rows=n, shards=shards)
        writer.manifest = ActivationsManifest(
            schema_version=1, width=width, dtype=dtype, splits=splits
        )
    return DatasetRef(store=store.uri, path=path, fingerprint="bench", rows=rows)
