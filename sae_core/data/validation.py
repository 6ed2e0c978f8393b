"""Per-shard summaries of an activations dataset, small enough for an expectation suite to check.

Expectation engines cannot look inside list columns, so each shard is reduced to flat tables: one
row per token (token_id, position, norm, max_abs, nonfinite), one row per dimension (mean, std) and
one facts record (could it be read, how many rows and what width and dtype it holds against what
the manifest promises). Shards are read one at a time in record batches, so memory stays at one
batch whatever the dataset size. Pure pyarrow/numpy/pandas: the suite itself lives in tasks/.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from sae_core.errors import DatasetDamaged, ValidationFailed
from sae_core.storage.layout import REQUIRED_COLUMNS, activation_layout, flat_values
from sae_core.storage.loader import open_shard
from sae_core.storage.manifests import ActivationsManifest, ActivationsShard
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

_READ_ROWS = 16384  # rows per record batch: ~38 MB of float32 at d=576


@dataclass(frozen=True)
class ShardFacts:
    """What one shard holds against what the manifest says it holds."""

    split: str
    name: str
    rows_manifest: int
    rows_read: int
    width_manifest: int
    width_read: int  # -1 when the activation column is missing or not a fixed-size list
    dtype_manifest: str
    dtype_read: str | None  # None when unknown (unreadable shard)
    readable: bool
    error: str = ""  # "" when readable

    @property
    def shard(self) -> str:
        return shard_path(self.split, self.name)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


class TableSummary(NamedTuple):
    tokens: pd.DataFrame  # [rows] token_id, position, norm, max_abs, nonfinite
    dims: pd.DataFrame  # [width] dim, mean, std, constant


class ShardSummary(NamedTuple):
    facts: ShardFacts
    tokens: pd.DataFrame  # empty when the shard is unreadable
    dims: pd.DataFrame


def shard_path(split: str, name: str) -> str:
    """Dataset-relative path of a shard; manifest names may or may not carry the split folder."""
    return name if "/" in name else f"{split}/{name}"


def _activation_matrix(batch: pa.RecordBatch | pa.Table, width: int) -> np.ndarray:
    """x: [rows, width] float32 of either storage layout; a null row becomes NaN so it counts as
    non-finite."""
    column = batch.column("activation")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat, _ = flat_values(batch)
    # Arrow's cast from float16 is ~10x faster than numpy's.
    x = flat.cast(pa.float32()).to_numpy(zero_copy_only=False).reshape(-1, width)
    if not column.null_count:
        return x
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if len(x) == len(column):  # the binary layout keeps null rows' slots
        x = x.copy()
        x[~valid] = np.nan
        return x
    full = np.full((len(column), width), np.nan, dtype=np.float32)  # a list skips them
    full[valid] = x
    return full


class SummaryBuilder:
    """Accumulates per-token rows and per-dimension moments over record batches of one shard.

    Per-dimension moments merge batch (count, mean, M2) triples in float64 (Chan et al.), which
    stays accurate where a running sum of squares would cancel.
    """

    def __init__(self, width: int):
        self.width = width
        self._tokens: list[pd.DataFrame] = []
        self._count = 0
        self._mean = np.zeros(width, dtype=np.float64)
        self._m2 = np.zeros(width, dtype=np.float64)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """batch: B rows. Cost: ~6 passes over the [B, d] float32 matrix."""
        x = _activation_matrix(batch, self.width)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported, not warned about
            self._add(batch, x)

    def _add(self, batch: pa.RecordBatch | pa.Table, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        self._tokens.append(
            pd.DataFrame(
                {
                    "token_id": batch.column("token_id").to_numpy(zero_copy_only=False),
                    "position": batch.column("position").to_numpy(zero_copy_only=False),
                    # float32 overflow to inf past ~1.8e19 is fine: such a norm fails the range check anyway
                    "norm": np.sqrt(np.einsum("ij,ij->i", x, x)),
                    "max_abs": np.abs(x).max(axis=1, initial=0.0),
                    "nonfinite": (~finite).sum(axis=1, dtype=np.int64),
                }
            )
        )
        n = len(x)
        if n == 0:
            return
        mean = x.mean(axis=0, dtype=np.float64)
        m2 = np.square(x - mean.astype(np.float32)).sum(axis=0, dtype=np.float64)
        total = self._count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.square(delta) * (self._count * n / total)
        self._count = total

    def finish(self) -> TableSummary:
        tokens = (
            pd.concat(self._tokens, ignore_index=True)
            if self._tokens
            else pd.DataFrame(columns=["token_id", "position", "norm", "max_abs", "nonfinite"])
        )
        if self._count:
            mean, std = self._mean, np.sqrt(self._m2 / self._count)
        else:  # no rows: moments are undefined, not zero
            mean = std = np.full(self.width, np.nan)
        dims = pd.DataFrame({"dim": np.arange(self.width), "mean": mean, "std": std})
        # One value repeated over 2+ tokens: a broken hook or a zero-filled buffer, not a model.
        dims["constant"] = (dims["std"] == 0) & (self._count > 1)
        return TableSummary(tokens, dims)


def summarize_table(table: pa.Table | pa.RecordBatch) -> TableSummary:
    """Summaries of an in-memory activations table; width comes from its schema."""
    width, _, error = activation_layout(table.schema)
    if error:
        raise ValueError(f"not an activations table: {error}")
    builder = SummaryBuilder(width)
    builder.add(table)
    return builder.finish()


def summarize_shard(
    store: Store, dataset: str, split: str, entry: ActivationsShard, width: int, dtype: str
) -> ShardSummary:
    """Read one shard in record batches; any read error becomes an unreadable-shard fact."""
    name = entry.name
    facts: dict[str, Any] = {
        "split": split,
        "name": name,
        "rows_manifest": entry.rows,
        "width_manifest": width,
        "dtype_manifest": dtype,
    }
    rows_read, width_read, dtype_read = 0, -1, None
    try:
        with open_shard(store, f"{dataset}/{shard_path(split, name)}", verify=True) as parquet:
            width_read, dtype_found, error = activation_layout(parquet.schema_arrow)
            if error:
                raise ValueError(error)
            builder = SummaryBuilder(width_read)
            for batch in parquet.iter_batches(
                batch_size=_READ_ROWS, columns=list(REQUIRED_COLUMNS)
            ):
                builder.add(batch)
                rows_read += batch.num_rows
            summary = builder.finish()
            dtype_read = dtype_found
    except Exception as err:  # noqa: BLE001 - a shard that cannot be read is a finding, not a crash
        message = str(err).splitlines()[0][:200] if str(err) else ""
        fact = ShardFacts(
            **facts,
            rows_read=rows_read,
            width_read=width_read,
            dtype_read=dtype_read,
            readable=False,
            # The reader's own error, not its wrapper (which repeats the shard's name).
            error=err.reason
            if isinstance(err, DatasetDamaged)
            else f"{type(err).__name__}: {message}",
        )
        return ShardSummary(fact, pd.DataFrame(), pd.DataFrame())
    fact = ShardFacts(
        **facts, rows_read=rows_read, width_read=width_read, dtype_read=dtype_read, readable=True
    )
    return ShardSummary(fact, summary.tokens, summary.dims)


def activation_manifest(ref: DatasetRef) -> ActivationsManifest:
    """The dataset's manifest, read as activations; raises ValidationFailed (the finding is
    what validation reports) if it is not one."""
    try:
        return ref.manifest(ActivationsManifest)
    except DatasetDamaged as err:
        raise ValidationFailed(f"dataset {ref.uri}: {err.reason}") from None


def summarize_dataset(
    ref: DatasetRef, splits: Iterable[str] | None = None, progress: bool = True
) -> Iterator[ShardSummary]:
    """Summaries of every shard the manifest lists (all splits unless named), one at a time."""
    manifest = activation_manifest(ref)
    store = ref.open_store()
    wanted = list(manifest.splits) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in manifest.splits]
    if unknown:
        raise ValidationFailed(f"dataset {ref.uri}: no split {', '.join(unknown)} in the manifest")
    shards = [(s, e) for s in wanted for e in manifest.splits[s].shards]
    for split, entry in tqdm(shards, desc="validate shards", unit="shard", disable=not progress):
        yield summarize_shard(store, ref.path, split, entry, manifest.width, manifest.dtype)
