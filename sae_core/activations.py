"""Activation datasets: extraction to Parquet shards, and deterministic shuffled reading.

One row per token: `activation: fixed_size_list<float>[d]`, `sequence` (the context_id of
the tokens dataset), `position`, `token_id`. Shards hold `shard_rows` rows (the last fewer)
and are written by a background thread so Parquet encoding overlaps the next forward pass.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_core.config import ConfigError, DataConfig
from sae_core.models import HookPoint, check_hook, run_to_hook
from sae_core.refs import DatasetRef
from sae_core.store import DatasetWriter

SCHEMA_VERSION = 1
SPLITS = ("train", "eval")
_ARROW_FLOATS = {"float32": pa.float32(), "float16": pa.float16()}
_TORCH_FLOATS = {"float32": torch.float32, "float16": torch.float16}
_ROW_GROUP = 8192  # rows per Parquet row group: the unit a streaming reader fetches


def ACTIVATION_SCHEMA(width: int, dtype: str = "float32") -> pa.Schema:  # noqa: N802 - contract name
    """Arrow schema of an activation shard of width `width` stored as `dtype`."""
    return pa.schema(
        [
            ("activation", pa.list_(_ARROW_FLOATS[dtype], width)),
            ("sequence", pa.int64()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
        ]
    )


def _read_tokens(ref: DatasetRef, split: str, context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [C, T] int64, context ids [C]) of one split of a tokens dataset."""
    with ref.open_store().open(f"{ref.path}/{split}.parquet") as fh:
        table = pq.read_table(fh, columns=["tokens", "context_id"])
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64)
    return tokens.reshape(-1, context_len), table.column("context_id").to_numpy()


class _ShardSink:
    """Collects rows and writes full shards of `shard_rows` in a background thread."""

    def __init__(self, writer: DatasetWriter, split: str, width: int, dtype: str, shard_rows: int):
        self.writer, self.split, self.shard_rows = writer, split, shard_rows
        self.schema = ACTIVATION_SCHEMA(width, dtype)
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.shards: list[Future[dict[str, Any]]] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.pending.append(columns)
        self.pending_rows += len(columns["sequence"])
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        merged = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        shard = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.pending = [rest] if len(rest["sequence"]) else []
        self.pending_rows -= rows
        # At most one shard in flight: bounds memory to about two shards.
        if self.shards:
            self.shards[-1].result()
        name = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        self.shards.append(self.pool.submit(self._write, name, shard))

    def _write(self, name: str, cols: dict[str, np.ndarray]) -> dict[str, Any]:
        width = self.schema.field("activation").type.list_size
        table = pa.table(
            {
                "activation": pa.FixedSizeListArray.from_arrays(
                    pa.array(cols["activation"].reshape(-1)), width
                ),
                "sequence": pa.array(cols["sequence"]),
                "position": pa.array(cols["position"]),
                "token_id": pa.array(cols["token_id"]),
            },
            schema=self.schema,
        )
        buf = io.BytesIO()
        # Activations barely compress; plain encoding keeps reads a memcpy.
        pq.write_table(
            table, buf, compression="none", use_dictionary=False, row_group_size=_ROW_GROUP
        )
        self.writer.write_bytes(name, buf.getvalue())
        return {"name": name, "rows": table.num_rows, "bytes": buf.tell()}

    def close(self) -> list[dict[str, Any]]:
        """Write the last partial shard, wait for all writes; the shard list for the manifest."""
        try:
            if self.pending_rows:
                self._flush(self.pending_rows)
            return [f.result() for f in self.shards]
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        # The dataset stays uncommitted (no manifest); just stop the writer thread.
        self.pool.shutdown(wait=True, cancel_futures=True)


def _batch_rows(
    model: nn.Module, ids: Tensor, context_ids: np.ndarray, point: HookPoint, data_cfg: DataConfig
) -> tuple[dict[str, np.ndarray], Tensor]:
    """Rows of one batch `ids: [B, T]` (position 0 and norms over max_norm dropped), and
    the kept rows' norms `[R]`. Cost: one forward through the blocks up to the hook."""
    first = 1 if data_cfg.skip_first_position else 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        acts = run_to_hook(model, ids.to(device), point)[:, first:, :].float()  # [B, T', d]
        norms = acts.norm(dim=-1)  # [B, T']
        if data_cfg.max_norm is None:
            keep = torch.ones_like(norms, dtype=torch.bool)
        else:
            keep = norms <= data_cfg.max_norm
        rows = acts[keep].to(_TORCH_FLOATS[data_cfg.storage_dtype]).cpu().numpy()  # [R, d]
        kept_norms = norms[keep].cpu()
    keep = keep.cpu()
    B, T = ids.shape
    positions = torch.arange(first, T, dtype=torch.int32).expand(B, -1)
    columns = {
        "activation": rows,
        "sequence": np.repeat(context_ids, T - first)[keep.reshape(-1).numpy()],
        "position": positions[keep].numpy(),
        "token_id": ids[:, first:][keep].numpy().astype(np.int32),
    }
    return columns, kept_norms


def _extract_split(
    model: nn.Module,
    tokens: DatasetRef,
    split: str,
    context_len: int,
    point: HookPoint,
    data_cfg: DataConfig,
    writer: DatasetWriter,
    progress: bool,
) -> tuple[int, dict[str, Any]]:
    """Extract one split into shards; (width, the split's manifest entry)."""
    ids, context_ids = _read_tokens(tokens, split, context_len)
    sink: _ShardSink | None = None
    kept = dropped = 0
    norm_sum, norm_max, width = 0.0, 0.0, 0
    step = data_cfg.batch_contexts
    bar = tqdm(total=len(ids), unit="ctx", desc=f"extract {split}", disable=not progress)
    try:
        for b in range(0, len(ids), step):
            batch = torch.from_numpy(ids[b : b + step])
            columns, norms = _batch_rows(model, batch, context_ids[b : b + step], point, data_cfg)
            width = columns["activation"].shape[1]
            if sink is None:
                sink = _ShardSink(writer, split, width, data_cfg.storage_dtype, data_cfg.shard_rows)
            sink.add(columns)
            kept += len(norms)
            dropped += batch[:, 1 if data_cfg.skip_first_position else 0 :].numel() - len(norms)
            if len(norms):
                norm_sum += float(norms.sum())
                norm_max = max(norm_max, float(norms.max()))
            bar.update(len(batch))
        shards = sink.close() if sink is not None else []
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        bar.close()
    if kept == 0:
        raise ConfigError(
            f"data.max_norm={data_cfg.max_norm}: dropped every {split} row; raise or unset it"
        )
    return width, {
        "rows": kept,
        "dropped_max_norm": dropped,
        "norm_mean": norm_sum / kept,
        "norm_max": norm_max,
        "shards": shards,
    }


def extract_activations(
    model: nn.Module,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hook: str,
    writer: DatasetWriter,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `model` to `hook` over every context of the tokens dataset and write the rows.

    Per forward: `batch_contexts` contexts [B, T] -> activations [B, T, d]; position 0 is
    dropped if `skip_first_position`, rows with norm > `max_norm` if it is set. Cost: the
    blocks up to the hook only, for every token of both splits. Returns (and sets) the manifest.
    """
    point = check_hook(model.config, hook)
    src = tokens.manifest()
    if data_cfg.skip_first_position and src["context_len"] < 2:
        raise ConfigError("data.context_len: must exceed 1 when data.skip_first_position is on")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and src.get("vocab_size", 0) > vocab:
        raise ConfigError(
            f"tokens {tokens.uri}: tokenizer vocabulary {src['vocab_size']} exceeds the "
            f"model's {vocab}; use the model's own tokenizer"
        )
    splits: dict[str, Any] = {}
    for split in SPLITS:
        width, splits[split] = _extract_split(
            model, tokens, split, src["context_len"], point, data_cfg, writer, progress
        )
    writer.manifest = {
        "kind": "activations",
        "schema_version": SCHEMA_VERSION,
        "fingerprint": writer.dataset.rsplit("/", 1)[-1],
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "hook": str(point),
        "dtype": data_cfg.storage_dtype,
        "width": width,
        "context_len": src["context_len"],
        "skip_first_position": data_cfg.skip_first_position,
        "max_norm": data_cfg.max_norm,
        "tokens": {"uri": tokens.uri, "fingerprint": tokens.fingerprint},
        "splits": splits,
    }
    return writer.manifest


def _split_manifest(ref: DatasetRef, split: str) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = ref.manifest()
    if manifest.get("kind") != "activations":
        raise ValueError(f"dataset {ref.uri} holds {manifest.get('kind')!r}, not activations")
    if split not in manifest["splits"]:
        raise ValueError(
            f"dataset {ref.uri} has no split {split!r}; it has {', '.join(manifest['splits'])}"
        )
    return manifest, manifest["splits"][split]


def read_split(ref: DatasetRef, split: str) -> Iterator[pa.RecordBatch]:
    """Stream a split's rows, shard by shard, as record batches of up to 8192 rows."""
    _, info = _split_manifest(ref, split)
    store = ref.open_store()
    for shard in info["shards"]:
        with store.open(f"{ref.path}/{shard['name']}") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=_ROW_GROUP)


def activation_matrix(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The `activation` column as a `[rows, d]` numpy view (no copy) in the storage dtype."""
    column = batch.column("activation")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=True).reshape(-1, column.type.list_size)


def load_split_tensor(ref: DatasetRef, split: str) -> Tensor:
    """All activations of a split as one `[N, d]` float32 tensor (N*d*4 bytes of memory)."""
    manifest, info = _split_manifest(ref, split)
    out = torch.empty(info["rows"], manifest["width"], dtype=torch.float32)
    view = out.numpy()
    row = 0
    for batch in read_split(ref, split):
        view[row : row + batch.num_rows] = activation_matrix(batch)
        row += batch.num_rows
    if row != info["rows"]:
        raise ValueError(
            f"dataset {ref.uri} split {split}: read {row} rows, manifest says {info['rows']}"
        )
    return out


def iter_batches(
    ref: DatasetRef,
    split: str,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[Tensor]:
    """Shuffled `[batch_size, d]` float32 batches of a split, the last partial batch dropped.

    The order is a permutation drawn from a generator seeded with `seed + epoch`: the same
    arguments give the same batches, and `start_batch` skips the first batches of an epoch
    (to resume training mid-epoch) without changing the rest.
    """
    data = load_split_tensor(ref, split)
    if batch_size > len(data):
        raise ConfigError(
            f"train.batch_size={batch_size} exceeds the {len(data)} rows of split '{split}' "
            f"of {ref.uri}; lower it or raise data.train_tokens"
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
    for b in range(start_batch, len(data) // batch_size):
        yield data[order[b * batch_size : (b + 1) * batch_size]]
