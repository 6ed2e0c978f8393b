"""Small references that stages hand each other: where a committed dataset is, never its data."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from sae_core.store import Store


class DatasetRef(BaseModel):
    """A committed dataset folder on a store, with the fingerprint that names it."""

    model_config = ConfigDict(frozen=True)

    store: str
    path: str
    fingerprint: str
    rows: int = 0

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.path}"

    def open_store(self) -> Store:
        return Store(self.store)

    def manifest(self) -> dict[str, Any]:
        manifest = self.open_store().manifest(self.path)
        if manifest is None:
            raise FileNotFoundError(
                f"dataset {self.uri} has no manifest: it was deleted or never finished"
            )
        return manifest
