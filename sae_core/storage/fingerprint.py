"""Content addresses: a stage's output folder is named by a hash of its inputs and its code."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from sae_core.storage.digests import file_digest


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 are the same setting
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-able values and pydantic models (key order ignored)."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@cache
def code_fingerprint(*modules: ModuleType) -> str:
    """A digest of the source of `modules`, and of the native sources a module lists in its
    `SOURCES` (paths of the files it compiles): editing any of them invalidates outputs."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        for file in (module.__file__, *getattr(module, "SOURCES", ())):
            digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


def path_fingerprint(paths: str | list[str], digest_cache: Path | None = None) -> str:
    """A digest of local files (or every file below a folder), by their names and content at
    any size; other strings hash as names. Content digests are remembered (`digests.file_digest`
    in `digest_cache`): an unchanged model costs a `stat` per file."""
    digest = hashlib.sha256()
    for entry in [paths] if isinstance(paths, str) else sorted(paths):
        root = Path(entry)
        if not root.exists():
            digest.update(entry.encode())
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            name = file.relative_to(root) if root.is_dir() else file.name
            digest.update(f"{name}:{file_digest(file, digest_cache)}".encode())
    return digest.hexdigest()[:16]
