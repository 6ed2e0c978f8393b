"""Activation datasets: the Parquet layout and extraction (several hooks, one forward pass, resumable).

One dataset per hook, one row per token: the activation [d] (sae_core.layout: how it is stored),
`sequence` (the context_id of the tokens dataset), `position`, `token_id`. Each split is cut into shards of
`shard_rows` rows (from data.shard_mb unless data.shard_rows is set; the last shard fewer).

Extraction reads the token contexts in batches of about data.batch_tokens tokens, runs the model
only up to the deepest requested hook, and hands each hook's rows to a `ShardWriter`, which cuts
shards and encodes and writes them in a background thread so the model does not wait on storage.
After each shard is written a completion mark records where the next shard starts (batch, rows
of that batch already written), so an interrupted extraction restarts at the first unwritten
shard (with `Store.resuming`). Storage dtype: data.storage_dtype for float32/float16 models;
bfloat16 activations are stored as float32 (exact; Parquet has no bfloat16, float16 would clip).
Reading lives in sae_core.loader.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_core.config import ConfigError, DataConfig
from sae_core.layout import (  # noqa: F401 - ACTIVATION_SCHEMA re-exported: the contract's name
    ACTIVATION_SCHEMA,
    STORAGE_SCHEMA,
    activation_matrix,
    storage_batch,
)
from sae_core.loader import (  # noqa: F401 - re-exported: train.py and others read through here
    iter_batches,
    load_split_tensor,
    read_split,
)
from sae_core.models import HookPoint, check_hook, model_width, run_to_hooks
from sae_core.refs import DatasetRef
from sae_core.store import DatasetWriter

SCHEMA_VERSION = 2  # the storage layout (sae_core.layout)
SPLITS = ("train", "eval")
_TORCH_FLOATS = {"float32": torch.float32, "float16": torch.float16}
_ROW_GROUP = 8192  # rows per Parquet row group: the unit a streaming reader fetches
_INDEX_BYTES = 8 + 4 + 4  # sequence, position, token_id per row


def shard_rows(data_cfg: DataConfig, width: int, dtype: str) -> int:
    """Rows per shard: data.shard_rows, else data.shard_mb worth of rows in whole row groups."""
    if data_cfg.shard_rows is not None:
        return data_cfg.shard_rows
    row_bytes = width * np.dtype(dtype).itemsize + _INDEX_BYTES
    rows = int(data_cfg.shard_mb * 2**20 // row_bytes)
    return max(1, rows // _ROW_GROUP * _ROW_GROUP or rows)


def storage_dtype(model: nn.Module, data_cfg: DataConfig) -> str:
    """The dtype activations are stored in: float32 for bfloat16 models, else as configured."""
    if next(model.parameters()).dtype == torch.bfloat16:
        return "float32"
    return data_cfg.storage_dtype


# Reading the token contexts -----------------------------------------------------------------
def _count_contexts(ref: DatasetRef, split: str) -> int:
    with ref.open_store().open(f"{ref.path}/{split}.parquet") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _token_batches(
    ref: DatasetRef, split: str, context_len: int, per_batch: int, start: int
) -> Iterator[tuple[int, Tensor, np.ndarray]]:
    """(batch index, token ids [B, T] int64, context ids [B]) for batches `start`, `start+1`, ...

    Streams the split's Parquet file, so memory holds about one batch whatever the corpus size.
    """
    index, ids_carry, ctx_carry = 0, [], []
    with ref.open_store().open(f"{ref.path}/{split}.parquet") as fh:
        for rb in pq.ParquetFile(fh).iter_batches(
            batch_size=max(per_batch, 1024), columns=["tokens", "context_id"]
        ):
            flat = rb.column("tokens").flatten().to_numpy(zero_copy_only=False)
            if flat.size != rb.num_rows * context_len:
                raise ValueError(
                    f"tokens {ref.uri} split {split}: contexts are not all {context_len} tokens"
                )
            ids_carry.append(flat.astype(np.int64).reshape(-1, context_len))
            ctx_carry.append(rb.column("context_id").to_numpy(zero_copy_only=False))
            ids, ctx = np.concatenate(ids_carry), np.concatenate(ctx_carry)
            full = len(ids) // per_batch * per_batch
            for b in range(0, full, per_batch):
                if index >= start:
                    yield index, torch.from_numpy(ids[b : b + per_batch]), ctx[b : b + per_batch]
                index += 1
            ids_carry, ctx_carry = [ids[full:]], [ctx[full:]]
    if ids_carry and len(ids_carry[0]) and index >= start:  # the last, partial batch
        yield index, torch.from_numpy(ids_carry[0]), ctx_carry[0]


# Writing shards -----------------------------------------------------------------------------
@dataclass
class _Piece:
    """The rows of one batch (from row `offset` of that batch on) not yet in a shard."""

    batch: int
    offset: int
    dropped_before: int  # rows dropped by max_norm in the batches before this one
    columns: dict[str, np.ndarray]  # activation [R, d], sequence, position, token_id, norm [R]

    @property
    def rows(self) -> int:
        return len(self.columns["sequence"])

    def split(self, n: int) -> tuple[dict[str, np.ndarray], _Piece]:
        head = {k: v[:n] for k, v in self.columns.items()}
        tail = _Piece(
            self.batch,
            self.offset + n,
            self.dropped_before,
            {k: v[n:] for k, v in self.columns.items()},
        )
        return head, tail


class ShardWriter:
    """Cuts one split's rows into shards of `rows_per_shard` and writes them in a background thread.

    Rows arrive per batch (`add`). After a shard is written, a completion mark
    `_progress/{split}/NNNNN.json` records its manifest entry and where the next shard starts:
    `next_batch` and `skip` (rows of that batch already in shards). A new ShardWriter on the same
    dataset folder picks up after the last contiguous mark: its `next_batch` says which batch to
    restart from, and `add` drops the rows that are already written.
    """

    def __init__(
        self, writer: DatasetWriter, split: str, width: int, dtype: str, rows_per_shard: int
    ):
        self.writer, self.split, self.rows_per_shard = writer, split, rows_per_shard
        self.schema = STORAGE_SCHEMA(width, dtype)
        marks = writer.done_marks(split)
        self.shards: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        while (mark := marks.get(f"{len(self.shards):05d}")) is not None:
            self.shards.append(mark["shard"])
            last = mark
        self.next_batch, self.skip = (last["next_batch"], last["skip"]) if last else (0, 0)
        self.dropped = last["dropped_before"] if last else 0
        self.last_batch = self.next_batch - 1
        self.pending: list[_Piece] = []
        self.pending_rows = 0
        self.in_flight: Future[None] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")

    def add(self, batch: int, columns: dict[str, np.ndarray], dropped: int) -> None:
        """Rows of batch `batch` (in order, every batch once) and how many max_norm dropped."""
        if batch < self.next_batch:
            return  # written by an earlier attempt
        skip = self.skip if batch == self.next_batch else 0
        piece = _Piece(batch, 0, self.dropped, columns).split(skip)[1]
        self.dropped += dropped
        self.last_batch = batch
        self.pending.append(piece)
        self.pending_rows += piece.rows
        while self.pending_rows >= self.rows_per_shard:
            self._cut(self.rows_per_shard)

    def _cut(self, rows: int) -> None:
        parts: list[dict[str, np.ndarray]] = []
        need = rows
        while need and self.pending:
            piece = self.pending[0]
            if piece.rows <= need:
                parts.append(piece.columns)
                self.pending.pop(0)
                need -= piece.rows
            else:
                head, self.pending[0] = piece.split(need)
                parts.append(head)
                need = 0
        self.pending_rows -= rows
        if self.pending:
            nxt = self.pending[0]
            resume = {
                "next_batch": nxt.batch,
                "skip": nxt.offset,
                "dropped_before": nxt.dropped_before,
            }
        else:
            resume = {"next_batch": self.last_batch + 1, "skip": 0, "dropped_before": self.dropped}
        # At most one shard in flight: memory stays at about two shards.
        if self.in_flight is not None:
            self.in_flight.result()
        index = len(self.shards)
        self.shards.append({})  # filled by the writer thread
        self.in_flight = self.pool.submit(self._write, index, parts, resume)

    def _write(
        self, index: int, parts: list[dict[str, np.ndarray]], resume: dict[str, int]
    ) -> None:
        batches = [storage_batch(p, self.schema) for p in parts]
        table = pa.Table.from_batches(batches, schema=self.schema)
        buf = io.BytesIO()
        # Activations barely compress; plain encoding keeps reads a memcpy. Uncompressed floats
        # would take a flipped bit silently: a CRC per page lets readers (loader.open_shard) see it.
        pq.write_table(
            table,
            buf,
            compression="none",
            use_dictionary=False,
            row_group_size=_ROW_GROUP,
            write_page_checksum=True,
        )
        name = f"{self.split}/shard-{index:05d}.parquet"
        self.writer.write_bytes(name, buf.getbuffer())
        norms = np.concatenate([p["norm"] for p in parts])
        entry = {
            "name": name,
            "rows": table.num_rows,
            "bytes": buf.tell(),
            "norm_sum": float(norms.sum(dtype=np.float64)),
            "norm_max": float(norms.max(initial=0.0)),
        }
        self.shards[index] = entry
        self.writer.mark_done(f"{self.split}/{index:05d}", {"shard": entry, **resume})

    def close(self) -> list[dict[str, Any]]:
        """Write the last partial shard, wait for every write; the split's shard entries."""
        try:
            if self.pending_rows:
                self._cut(self.pending_rows)
            if self.in_flight is not None:
                self.in_flight.result()
            return self.shards
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        # The shard already handed to the writer (at most one) is finished with its mark: it is
        # valid progress for the next attempt. A failed write just leaves no mark.
        self.pool.shutdown(wait=True)


# Extraction ---------------------------------------------------------------------------------
def _batch_rows(
    outputs: list[Tensor],
    ids: Tensor,
    context_ids: np.ndarray,
    first: int,
    max_norm: float | None,
    dtype: str,
) -> list[tuple[dict[str, np.ndarray], int]]:
    """Per hook output `[B, T, d]`: the rows to store (position < first and norms over max_norm
    dropped), with their norms `[R]`, and the number dropped by max_norm."""
    B, T = ids.shape
    index = {
        "sequence": np.repeat(context_ids, T - first),
        "position": np.tile(np.arange(first, T, dtype=np.int32), B),
        "token_id": ids[:, first:].reshape(-1).numpy().astype(np.int32),
    }
    rows = []
    for out in outputs:
        x = out[:, first:, :].reshape(B * (T - first), -1).float()  # [R, d]
        norms = torch.linalg.vector_norm(x, dim=-1)
        columns = dict(index)
        dropped = 0
        if max_norm is not None:
            keep = norms <= max_norm
            dropped = int((~keep).sum())
            x, norms = x[keep], norms[keep]
            mask = keep.cpu().numpy()
            columns = {k: v[mask] for k, v in index.items()}
        columns["activation"] = x.to(_TORCH_FLOATS[dtype]).cpu().numpy()
        columns["norm"] = norms.cpu().numpy()
        rows.append((columns, dropped))
    return rows


def _split_entry(sink: ShardWriter, split: str, max_norm: float | None) -> dict[str, Any]:
    shards = sink.close()
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        raise ConfigError(f"data.max_norm={max_norm}: dropped every {split} row; raise or unset it")
    return {
        "rows": rows,
        "dropped_max_norm": sink.dropped,
        "norm_mean": sum(s["norm_sum"] for s in shards) / rows,
        "norm_max": max(s["norm_max"] for s in shards),
        "shards": shards,
    }


def _extract_split(
    model: nn.Module,
    tokens: DatasetRef,
    split: str,
    context_len: int,
    points: list[HookPoint],
    data_cfg: DataConfig,
    sinks: list[ShardWriter],
    dtype: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """Extract one split for every hook; the split's manifest entry per hook."""
    per_batch = max(1, data_cfg.batch_tokens // context_len)
    contexts = _count_contexts(tokens, split)
    n_batches = -(-contexts // per_batch)
    start = min(s.next_batch for s in sinks)
    first = 1 if data_cfg.skip_first_position else 0
    device = next(model.parameters()).device
    bar = tqdm(
        total=contexts,
        initial=min(contexts, start * per_batch),
        unit="ctx",
        desc=f"extract {split}",
        disable=not progress,
    )
    try:
        if start < n_batches:
            for b, ids, context_ids in _token_batches(tokens, split, context_len, per_batch, start):
                with torch.inference_mode():
                    outputs = run_to_hooks(model, ids.to(device), points)
                    rows = _batch_rows(outputs, ids, context_ids, first, data_cfg.max_norm, dtype)
                for sink, (columns, dropped) in zip(sinks, rows, strict=True):
                    sink.add(b, columns, dropped)
                bar.update(len(ids))
        return [_split_entry(sink, split, data_cfg.max_norm) for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    finally:
        bar.close()


def extract_hooks(
    model: nn.Module,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hooks: Sequence[str],
    writers: Sequence[DatasetWriter],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run `model` over every context of the tokens dataset once, writing one dataset per hook.

    Per forward: about `batch_tokens` tokens as [B, T] contexts -> one [B, T, d] activation per
    hook; position 0 is dropped if `skip_first_position`, rows with norm > `max_norm` if it is set.
    Cost: the blocks up to the deepest hook, for every token of both splits. Writers opened with
    `Store.resuming` continue an interrupted extraction. Returns (and sets) each manifest.
    """
    if len(hooks) != len(writers) or not hooks:
        raise ValueError(f"extract_hooks: {len(hooks)} hooks for {len(writers)} writers")
    points = [check_hook(model.config, hook) for hook in hooks]
    src = tokens.manifest()
    if data_cfg.skip_first_position and src["context_len"] < 2:
        raise ConfigError("data.context_len: must exceed 1 when data.skip_first_position is on")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and src.get("vocab_size", 0) > vocab:
        raise ConfigError(
            f"tokens {tokens.uri}: tokenizer vocabulary {src['vocab_size']} exceeds the "
            f"model's {vocab}; use the model's own tokenizer"
        )
    width, dtype = model_width(model.config), storage_dtype(model, data_cfg)
    rows_per_shard = shard_rows(data_cfg, width, dtype)
    splits: list[dict[str, Any]] = [{} for _ in hooks]
    for split in SPLITS:
        sinks = [ShardWriter(w, split, width, dtype, rows_per_shard) for w in writers]
        entries = _extract_split(
            model, tokens, split, src["context_len"], points, data_cfg, sinks, dtype, progress
        )
        for per_hook, entry in zip(splits, entries, strict=True):
            per_hook[split] = entry
    for writer, point, per_hook in zip(writers, points, splits, strict=True):
        writer.manifest = {
            "kind": "activations",
            "schema_version": SCHEMA_VERSION,
            "fingerprint": writer.dataset.rsplit("/", 1)[-1],
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "hook": str(point),
            "dtype": dtype,
            "width": width,
            "context_len": src["context_len"],
            "batch_tokens": data_cfg.batch_tokens,
            "shard_rows": rows_per_shard,
            "skip_first_position": data_cfg.skip_first_position,
            "max_norm": data_cfg.max_norm,
            "tokens": {"uri": tokens.uri, "fingerprint": tokens.fingerprint},
            "splits": per_hook,
        }
    return [w.manifest for w in writers]


def extract_activations(
    model: nn.Module,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hook: str,
    writer: DatasetWriter,
    progress: bool = True,
) -> dict[str, Any]:
    """One hook's dataset: `extract_hooks` with a single hook. Returns (and sets) the manifest."""
    return extract_hooks(model, tokens, data_cfg, [hook], [writer], progress)[0]
