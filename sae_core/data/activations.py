"""Activation datasets: the Parquet layout and extraction (several hooks, one forward pass, by shard).

One dataset per hook, one row per token: the activation [d] (sae_core.storage.layout: how it is stored),
`sequence` (the context_id of the tokens dataset), `position`, `token_id`.

Extraction is cut into shards, each an independent unit of work: shard j of a split holds the
token contexts [j C, (j+1) C) of that split, C = `contexts_per_shard` (as many whole contexts as
fit in data.shard_rows rows, or data.shard_mb when shard_rows is unset). A shard runs its contexts
through the model in fixed forward batches of about data.batch_tokens tokens (the model only up
to the deepest requested hook), so its bytes do not depend on which process makes it or in which
order the shards are made. After a shard's file is written, its completion mark
`_progress/{split}/NNNNN.json` holds its manifest entry; a shard is done when its mark exists, so
an interrupted extraction only makes the shards without one. The manifest, written last, sums
the marks (`activation_manifest`). data.max_norm drops rows inside a shard; a shard left with no
row has a mark and no file. Storage dtype: data.storage_dtype for float32/float16 models;
bfloat16 activations are stored as float32 (exact; Parquet has no bfloat16, float16 would clip).
Reading lives in sae_core.storage.loader.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import DataConfig
from sae_core.data.models import HookPoint, check_hook, model_width, run_to_hooks
from sae_core.device import device_name
from sae_core.errors import ConfigError
from sae_core.storage.layout import STORAGE_SCHEMA, storage_batch
from sae_core.storage.manifests import (
    ActivationsManifest,
    ActivationsShard,
    ActivationsSplit,
    DatasetLink,
    TokensManifest,
)
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import DatasetWriter

# A batch [B, T] of token ids -> one [B, T, d] activation per hook, in the hooks' order.
HookForward = Callable[[Tensor], list[Tensor]]

SCHEMA_VERSION = 2  # the storage layout (sae_core.storage.layout)
SPLITS = ("train", "eval")
_TORCH_FLOATS = {"float32": torch.float32, "float16": torch.float16}
_ROW_GROUP = 8192  # rows per Parquet row group: the unit a streaming reader fetches
_INDEX_BYTES = 8 + 4 + 4  # sequence, position, token_id per row


def shard_rows(data_cfg: DataConfig, width: int, dtype: str) -> int:
    """The most rows a shard holds: data.shard_rows, else data.shard_mb worth in whole row groups."""
    if data_cfg.shard_rows is not None:
        return data_cfg.shard_rows
    row_bytes = width * np.dtype(dtype).itemsize + _INDEX_BYTES
    rows = int(data_cfg.shard_mb * 2**20 // row_bytes)
    return max(1, rows // _ROW_GROUP * _ROW_GROUP or rows)


def model_dtype(model: nn.Module) -> str:
    """The dtype of a loaded model's weights, as model.dtype names it (e.g. "bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def storage_dtype(model_dtype: str, data_cfg: DataConfig) -> str:
    """The dtype activations are stored in: float32 for bfloat16 models, else as configured."""
    return "float32" if model_dtype == "bfloat16" else data_cfg.storage_dtype


def first_position(data_cfg: DataConfig) -> int:
    """The first stored position of a context: 1 when data.skip_first_position drops position 0."""
    return 1 if data_cfg.skip_first_position else 0


def contexts_per_shard(data_cfg: DataConfig, width: int, dtype: str, context_len: int) -> int:
    """Whole contexts per shard: as many as fit in `shard_rows` rows, at least one."""
    per_context = context_len - first_position(data_cfg)
    return max(1, shard_rows(data_cfg, width, dtype) // per_context)


# Planning ------------------------------------------------------------------------------------
class ShardRange(NamedTuple):
    """Shard `index` of a split: the contexts [start, stop) of the tokens dataset's split."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """The shard's file in the dataset folder."""
        return f"{self.split}/shard-{self.index:05d}.parquet"

    @property
    def part(self) -> str:
        """The shard's completion mark (DatasetWriter.mark_done)."""
        return f"{self.split}/{self.index:05d}"


def check_tokens(tokens: DatasetRef, data_cfg: DataConfig, vocab: int | None) -> TokensManifest:
    """The tokens manifest, once checked against the extraction settings and the model's vocabulary."""
    src = tokens.manifest(TokensManifest)
    if data_cfg.skip_first_position and src.context_len < 2:
        raise ConfigError("data.context_len: must exceed 1 when data.skip_first_position is on")
    if vocab is not None and src.vocab_size > vocab:
        raise ConfigError(
            f"tokens {tokens.uri}: tokenizer vocabulary {src.vocab_size} exceeds the "
            f"model's {vocab}; use the model's own tokenizer"
        )
    return src


def plan_shards(
    src: TokensManifest, data_cfg: DataConfig, width: int, dtype: str
) -> list[ShardRange]:
    """Every shard of both splits, train first, from the tokens manifest `src`."""
    per_shard = contexts_per_shard(data_cfg, width, dtype, src.context_len)
    shards = []
    for split in SPLITS:
        contexts = src.splits[split].contexts
        for index, start in enumerate(range(0, contexts, per_shard)):
            shards.append(ShardRange(split, index, start, min(start + per_shard, contexts)))
    return shards


# Extracting one shard ---------------------------------------------------------------------------
def _read_contexts(
    ref: DatasetRef, shard: ShardRange, context_len: int
) -> tuple[Tensor, np.ndarray]:
    """Token ids `[C, T]` int64 and context ids `[C]` of the shard's contexts; reads only the
    row groups of the split's Parquet file that hold them."""
    with ref.open_store().open(f"{ref.path}/{shard.split}.parquet") as fh:
        parquet = pq.ParquetFile(fh)
        groups, first_row, row = [], 0, 0
        for g in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            if row < shard.stop and row + rows > shard.start:
                first_row = row if not groups else first_row
                groups.append(g)
            row += rows
        table = parquet.read_row_groups(groups, columns=["tokens", "context_id"])
    table = table.slice(shard.start - first_row, shard.stop - shard.start)
    flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != table.num_rows * context_len:
        raise ValueError(
            f"tokens {ref.uri} split {shard.split}: contexts are not all {context_len} tokens"
        )
    ids = torch.from_numpy(flat.astype(np.int64).reshape(-1, context_len))
    return ids, table.column("context_id").to_numpy()


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


def write_shard(
    writer: DatasetWriter, name: str, parts: list[dict[str, np.ndarray]], schema: pa.Schema
) -> ActivationsShard:
    """Encode rows (`parts`: activation [R, d], sequence, position, token_id, norm [R] each) as
    one Parquet shard and write it; its manifest entry. Cost: one copy of the rows."""
    table = pa.Table.from_batches([storage_batch(p, schema) for p in parts], schema=schema)
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
    writer.write_bytes(name, buf.getbuffer())
    norms = np.concatenate([p["norm"] for p in parts])
    return ActivationsShard(
        name=name,
        rows=table.num_rows,
        bytes=buf.tell(),
        norm_sum=float(norms.sum(dtype=np.float64)),
        norm_max=float(norms.max(initial=0.0)),
    )


def extract_shard(
    model: nn.Module,
    tokens: DatasetRef,
    shard: ShardRange,
    data_cfg: DataConfig,
    hooks: Sequence[str],
    writers: Sequence[DatasetWriter],
    forward: HookForward | None = None,
) -> None:
    """Make one shard of every hook's dataset: its file, then its completion mark.

    The shard's C contexts go through `model` in forward batches of about `batch_tokens` tokens
    ([B, T] -> one [B, T, d] activation per hook), counted from the shard's first context: the
    same batches whichever process runs the shard. `forward` runs a batch to the hooks in place
    of `run_to_hooks` (sae_core.data.compiled). Cost: the blocks up to the deepest hook for
    C * T tokens; memory: the shard's rows per hook.
    """
    if len(hooks) != len(writers) or not hooks:
        raise ValueError(f"extract_shard: {len(hooks)} hooks for {len(writers)} writers")
    points = [check_hook(model.config, hook) for hook in hooks]
    context_len = tokens.manifest(TokensManifest).context_len
    device = next(model.parameters()).device
    source = {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
              "model_dtype": model_dtype(model), "width": model_width(model.config),
              "device": device_name(device)}  # fmt: skip
    dtype = storage_dtype(source["model_dtype"], data_cfg)
    ids, context_ids = _read_contexts(tokens, shard, context_len)
    per_batch = max(1, data_cfg.batch_tokens // context_len)
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in hooks]
    dropped = [0] * len(hooks)
    for b in range(0, len(ids), per_batch):
        stopping.check()  # between forward batches: a stop leaves this shard unmarked, to redo
        batch = ids[b : b + per_batch]
        with torch.inference_mode():
            ids_on_device = batch.to(device)
            outputs = (
                forward(ids_on_device) if forward else run_to_hooks(model, ids_on_device, points)
            )
            rows = _batch_rows(
                outputs, batch, context_ids[b : b + per_batch], first_position(data_cfg),
                data_cfg.max_norm, dtype,
            )  # fmt: skip
        for i, (columns, n_dropped) in enumerate(rows):
            parts[i].append(columns)
            dropped[i] += n_dropped
    schema = STORAGE_SCHEMA(source["width"], dtype)
    for writer, hook_parts, n_dropped in zip(writers, parts, dropped, strict=True):
        entry = None
        if sum(len(p["sequence"]) for p in hook_parts):
            written = write_shard(writer, shard.name, hook_parts, schema)
            entry = written.model_copy(update={"contexts": (shard.start, shard.stop)}).to_json()
        writer.mark_done(
            shard.part, {"shard": entry, "dropped_max_norm": n_dropped, "source": source}
        )


# The manifest -----------------------------------------------------------------------------------
def activation_manifest(
    writer: DatasetWriter,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hook: str,
    shards: Sequence[ShardRange],
) -> ActivationsManifest:
    """The manifest of a dataset whose every shard is marked done, from the marks."""
    src = tokens.manifest(TokensManifest)
    marks = {split: writer.done_marks(split) for split in SPLITS}
    missing = [s.name for s in shards if f"{s.index:05d}" not in marks[s.split]]
    if missing:
        raise RuntimeError(
            f"activations {writer.dataset}: {len(missing)} shards not written ({missing[0]}, ...); "
            "run the extraction again"
        )
    source = marks[shards[0].split][f"{shards[0].index:05d}"]["source"]
    # Shards may be made on several machines (a Dask cluster); an older attempt's marks name no
    # device.
    done_sources = [marks[s.split][f"{s.index:05d}"]["source"] for s in shards]
    devices = {mark["device"] for mark in done_sources if "device" in mark}
    dtype = storage_dtype(source["model_dtype"], data_cfg)
    splits = {}
    for split in SPLITS:
        done = [marks[split][f"{s.index:05d}"] for s in shards if s.split == split]
        entries = [
            ActivationsShard.model_validate(m["shard"]) for m in done if m["shard"] is not None
        ]
        rows = sum(e.rows for e in entries)
        if rows == 0:
            raise ConfigError(
                f"data.max_norm={data_cfg.max_norm}: dropped every {split} row; raise or unset it"
            )
        splits[split] = ActivationsSplit(
            rows=rows,
            dropped_max_norm=sum(m["dropped_max_norm"] for m in done),
            norm_mean=sum(e.norm_sum for e in entries) / rows,
            norm_max=max(e.norm_max for e in entries),
            shards=entries,
        )
    return ActivationsManifest(
        schema_version=SCHEMA_VERSION,
        fingerprint=writer.fingerprint,
        model=source["model"],
        model_dtype=source["model_dtype"],
        model_devices=sorted(devices) or None,
        hook=str(HookPoint.parse(hook)),
        dtype=dtype,
        width=source["width"],
        context_len=src.context_len,
        batch_tokens=data_cfg.batch_tokens,
        shard_rows=shard_rows(data_cfg, source["width"], dtype),
        contexts_per_shard=shards[0].stop - shards[0].start,
        skip_first_position=data_cfg.skip_first_position,
        max_norm=data_cfg.max_norm,
        tokens=DatasetLink(uri=tokens.uri, fingerprint=tokens.fingerprint),
        splits=splits,
    )


# Extraction in this process ---------------------------------------------------------------------
def extract_hooks(
    model: nn.Module,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hooks: Sequence[str],
    writers: Sequence[DatasetWriter],
    progress: bool = True,
    forward: HookForward | None = None,
) -> list[ActivationsManifest]:
    """Run `model` over every context of the tokens dataset once, writing one dataset per hook.

    Per forward: about `batch_tokens` tokens as [B, T] contexts -> one [B, T, d] activation per
    hook; position 0 is dropped if `skip_first_position`, rows with norm > `max_norm` if it is set.
    `forward`: as in extract_shard. Cost: the blocks up to the deepest hook, for every token of
    both splits. Shards already
    marked done in every writer (writers opened with `Store.resuming`) are skipped. Returns (and
    sets) each manifest.
    """
    if len(hooks) != len(writers) or not hooks:
        raise ValueError(f"extract_hooks: {len(hooks)} hooks for {len(writers)} writers")
    for hook in hooks:
        check_hook(model.config, hook)
    src = check_tokens(tokens, data_cfg, getattr(model.config, "vocab_size", None))
    width = model_width(model.config)
    shards = plan_shards(src, data_cfg, width, storage_dtype(model_dtype(model), data_cfg))
    done = [set().union(*(w.done_parts(split) for split in SPLITS)) for w in writers]
    todo = [s for s in shards if any(s.part not in d for d in done)]
    contexts = sum(s.stop - s.start for s in shards)
    with tqdm(
        total=contexts,
        initial=contexts - sum(s.stop - s.start for s in todo),
        unit="ctx",
        desc="extract",
        disable=not progress,
    ) as bar:
        for shard in todo:
            lacking = [i for i, d in enumerate(done) if shard.part not in d]
            extract_shard(
                model, tokens, shard, data_cfg,
                [hooks[i] for i in lacking], [writers[i] for i in lacking], forward,
            )  # fmt: skip
            bar.update(shard.stop - shard.start)
    manifests = [
        activation_manifest(writer, tokens, data_cfg, hook, shards)
        for writer, hook in zip(writers, hooks, strict=True)
    ]
    for writer, manifest in zip(writers, manifests, strict=True):
        writer.manifest = manifest
    return manifests


def extract_activations(
    model: nn.Module,
    tokens: DatasetRef,
    data_cfg: DataConfig,
    hook: str,
    writer: DatasetWriter,
    progress: bool = True,
) -> ActivationsManifest:
    """One hook's dataset: `extract_hooks` with a single hook. Returns (and sets) the manifest."""
    return extract_hooks(model, tokens, data_cfg, [hook], [writer], progress)[0]
