"""How activation rows sit in a Parquet shard, and getting them back as `[rows, d]` arrays without copies.

Readers see one Arrow schema (`ACTIVATION_SCHEMA`): `activation: fixed_size_list<float>[d]`,
`sequence`, `position`, `token_id`. On disk there are two layouts:
- schema version 2 (written now): `activation` is `fixed_size_binary[d * itemsize]`, the row's
  floats as raw little-endian bytes, with the float type and width in the field's metadata.
  Parquet decodes it as one plain buffer (~10x faster than a list: a nested list column carries a
  repetition level per float, and decoding those dominates reading);
- schema version 1: `activation` is the `fixed_size_list<float>[d]` itself.
`activation_matrix` reads either into a `[rows, d]` view of the Arrow buffer.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pyarrow as pa

FLOAT_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
REQUIRED_COLUMNS = ("activation", "sequence", "position", "token_id")
_DTYPE_KEY, _WIDTH_KEY = b"saeflow.dtype", b"saeflow.width"
_INDEX_FIELDS = [
    pa.field("sequence", pa.int64()),
    pa.field("position", pa.int32()),
    pa.field("token_id", pa.int32()),
]

if sys.byteorder != "little":  # the raw bytes are little-endian floats
    raise ImportError("saeflow's activation layout needs a little-endian machine")


def ACTIVATION_SCHEMA(width: int, dtype: str = "float32") -> pa.Schema:  # noqa: N802 - contract name
    """The Arrow schema readers see for rows of width `width` stored as `dtype` (a list column)."""
    return pa.schema([pa.field("activation", pa.list_(FLOAT_TYPES[dtype], width)), *_INDEX_FIELDS])


def STORAGE_SCHEMA(width: int, dtype: str = "float32") -> pa.Schema:  # noqa: N802 - contract name
    """The schema written to Parquet (version 2): the activation as fixed-size raw bytes."""
    field = pa.field(
        "activation",
        pa.binary(width * np.dtype(dtype).itemsize),
        nullable=False,
        metadata={_DTYPE_KEY: dtype.encode(), _WIDTH_KEY: str(width).encode()},
    )
    return pa.schema([field, *_INDEX_FIELDS])


def storage_batch(columns: dict[str, np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    """A record batch in the storage layout from `activation [R, d]` (C-contiguous) and the index
    columns; the arrays are wrapped, not copied."""
    x = np.ascontiguousarray(columns["activation"])
    field = schema.field("activation")
    activation = pa.FixedSizeBinaryArray.from_buffers(field.type, len(x), [None, pa.py_buffer(x)])
    return pa.RecordBatch.from_arrays(
        [activation, *(pa.array(columns[f.name], f.type) for f in _INDEX_FIELDS)], schema=schema
    )


def activation_layout(schema: pa.Schema) -> tuple[int, str, str]:
    """(width, dtype, error) of the activation column of either layout; error is "" when usable."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        return -1, "", f"missing columns {', '.join(missing)}"
    return _field_layout(schema.field("activation"))


def _field_layout(field: pa.Field) -> tuple[int, str, str]:
    kind = field.type
    if pa.types.is_fixed_size_binary(kind):
        meta = field.metadata or {}
        dtype = meta.get(_DTYPE_KEY, b"").decode()
        if dtype not in FLOAT_TYPES or not meta.get(_WIDTH_KEY, b"").isdigit():
            return -1, "", f"activation column is {kind} without saeflow dtype/width metadata"
        width = int(meta[_WIDTH_KEY])
        if width * np.dtype(dtype).itemsize != kind.byte_width:
            return width, dtype, f"activation bytes {kind.byte_width} != {width} x {dtype}"
        return width, dtype, ""
    if not pa.types.is_fixed_size_list(kind):
        return -1, "", f"activation column is {kind}, expected fixed_size_list<float>[d]"
    if not pa.types.is_floating(kind.value_type):
        return (
            kind.list_size,
            str(kind.value_type),
            f"activation values are {kind.value_type}, expected float",
        )
    return kind.list_size, np.dtype(kind.value_type.to_pandas_dtype()).name, ""


def flat_values(batch: pa.RecordBatch | pa.Table) -> tuple[pa.Array, int]:
    """(the activation floats of every row as one flat Arrow array, width d), without copying.

    Null rows (never written by saeflow) keep their slot in the binary layout; a list column's
    flatten() skips them: callers that care check `column.null_count` first.
    """
    column = batch.column("activation")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width, dtype, error = _field_layout(batch.schema.field("activation"))
    if error:
        raise ValueError(f"not an activation column: {error}")
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten(), width
    item = np.dtype(dtype).itemsize
    values = column.buffers()[1]
    start = column.offset * width * item
    flat = pa.Array.from_buffers(
        FLOAT_TYPES[dtype],
        len(column) * width,
        [None, values.slice(start, len(column) * width * item)],
    )
    return flat, width


def activation_matrix(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The `activation` column as a read-only `[rows, d]` numpy view (no copy), storage dtype."""
    flat, width = flat_values(batch)
    return flat.to_numpy(zero_copy_only=True).reshape(-1, width)


def read_activations(source: Any) -> np.ndarray:
    """A stored activation shard (a path or an open binary file: `.../shard-*.parquet` of an
    activations dataset) as float32 `[rows, d]`: the input a registered model's `predict` takes.
    Either layout; float16 shards are widened."""
    import pyarrow.parquet as pq

    table = pq.read_table(source, columns=["activation"])
    if table.column("activation").null_count:
        raise ValueError("activation column has null rows: not a shard saeflow wrote")
    return activation_matrix(table).astype(np.float32)
