"""Synthetic activations: tokens made of a few dictionary features, written as a committed
activations dataset, and a spy on the trainer's reads of it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_core.storage.layout import ACTIVATION_SCHEMA
from sae_core.storage.manifests import ActivationsManifest, ActivationsShard, ActivationsSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import DatasetWriter, Store


def sparse_dictionary_data(
    n_tokens: int, d: int = 32, n_features: int = 64, active: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that are sums of `active` unit features with coefficients in [0.1, 1]."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, n_features, generator=g).argsort(dim=1)[:, :active]
    coef = torch.rand(n_tokens, active, generator=g) * 0.9 + 0.1
    return (coef[..., None] * features[which]).sum(dim=1), features


def write_shard_table(
    writer: DatasetWriter, path: str, name: str, table: pa.Table, x: np.ndarray, **parquet
) -> ActivationsShard:
    """Write `table` (the rows x [rows, d]) as the Parquet file `path` of the dataset; the
    manifest entry naming it `name`."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet)
    writer.write_bytes(path, buf.getvalue())
    norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    return ActivationsShard(
        name=name,
        rows=table.num_rows,
        bytes=buf.tell(),
        norm_sum=float(norms.sum()),
        norm_max=float(norms.max(initial=0.0)),
    )


def write_activations(
    store: Store, path: str, train: torch.Tensor, eval_: torch.Tensor, **parquet
) -> DatasetRef:
    """A committed activations dataset in the contract's layout, one shard per split (parquet:
    pyarrow's write_table options, e.g. row_group_size)."""
    d = train.shape[1]
    splits = {}
    with store.writing(path) as w:
        for split, x in (("train", train), ("eval", eval_)):
            n = x.shape[0]
            table = pa.table(
                {
                    "activation": pa.FixedSizeListArray.from_arrays(
                        pa.array(x.reshape(-1).numpy()), d
                    ),
                    "sequence": pa.array(range(n), pa.int64()),
                    "position": pa.array([1] * n, pa.int32()),
                    "token_id": pa.array([0] * n, pa.int32()),
                },
                schema=ACTIVATION_SCHEMA(d),
            )
            name = f"{split}/shard-00000.parquet"
            shard = write_shard_table(w, name, name, table, x.numpy(), **parquet)
            splits[split] = ActivationsSplit(rows=n, shards=[shard])
        w.manifest = ActivationsManifest(
            schema_version=1, fingerprint="test", width=d, dtype="float32", splits=splits
        )
    return DatasetRef(store=store.uri, path=path, fingerprint="test", rows=train.shape[0])


def count_train_reads(monkeypatch) -> list[tuple[int, int, int]]:
    """Record every call of the training reader on a train split: (batch_size, epoch, start)."""
    from sae_core.training import train

    calls: list[tuple[int, int, int]] = []
    real = train.iter_batches

    def counted(ref, split, batch_size, seed, epoch=0, start_batch=0, **kw):
        if split == "train":
            calls.append((batch_size, epoch, start_batch))
        return real(ref, split, batch_size, seed, epoch, start_batch, **kw)

    monkeypatch.setattr(train, "iter_batches", counted)
    return calls
