"""SAE files as safetensors bytes: reading the metadata header without unpickling anything, and
writing the same bytes in every process."""

from __future__ import annotations

import json
import struct
from typing import Any

from safetensors.torch import save as save_tensors
from torch import Tensor

from sae_core.errors import ConfigError


def safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors byte string (an 8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise ConfigError("safetensors data is truncated: fewer than 8 bytes")
    (size,) = struct.unpack("<Q", data[:8])
    try:  # anything else (a pickle, a truncated file) is refused here, never unpickled
        header = json.loads(data[8 : 8 + size]) if size <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ConfigError("not a safetensors file: its header is missing or not JSON")
    return header.get("__metadata__") or {}


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """`tensors` and `metadata` as a safetensors byte string, the same bytes in every process.

    safetensors writes its metadata in the order of a hash map seeded per process, so one SAE
    saved twice would differ byte for byte; the header is rewritten with the keys sorted (the
    data offsets, relative to the end of the header, are unchanged)."""
    data = save_tensors(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + data[8 + size :]
