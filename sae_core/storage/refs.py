"""Small references that stages hand each other: where a committed dataset is, never its data."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sae_core.storage.manifests import AnyManifest
from sae_core.storage.store import Store


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

    def manifest(self, kind: type[AnyManifest]) -> AnyManifest:
        """The committed manifest, read by the model `kind` (DatasetDamaged if it does not fit)."""
        manifest = self.open_store().manifest(self.path)
        if manifest is None:
            raise FileNotFoundError(
                f"dataset {self.uri} has no manifest: it was deleted or never finished"
            )
        return kind.from_json(manifest, self.uri)


def committed_dataset(uri: str, kind: str) -> DatasetRef | None:
    """`STORE/KIND/FINGERPRINT` (a local path or s3://) as a reference, or None unless it names
    a committed dataset of that kind."""
    store, _, fp = uri.rstrip("/").rpartition("/")
    store, _, found = store.rpartition("/")
    ref = DatasetRef(store=store, path=f"{found}/{fp}", fingerprint=fp)
    return ref if found == kind and ref.open_store().is_committed(ref.path) else None
