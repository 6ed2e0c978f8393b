"""Where a stage's output lives: a folder on the store named by a fingerprint of the stage's
inputs and of its code."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from sae_core.config import ModelConfig
from sae_core.data.assets import resolve_corpus, resolve_model_path
from sae_core.storage.fingerprint import code_fingerprint, fingerprint, path_fingerprint
from sae_core.storage.manifests import AnyManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store


class Location(NamedTuple):
    """Where a stage's output lives: the store URI, the dataset folder and its fingerprint."""

    store: str
    """The store's URI: a local directory or s3://bucket/prefix."""
    path: str
    """The dataset folder on the store: `<stage>/<fingerprint>`."""
    fingerprint: str
    """The digest of the stage's inputs and code that names the folder."""

    def ref(self, rows: int = 0) -> DatasetRef:
        return DatasetRef(store=self.store, path=self.path, fingerprint=self.fingerprint, rows=rows)

    def is_committed(self) -> bool:
        return Store(self.store).is_committed(self.path)

    def remove(self) -> None:
        """Delete the output folder, committed or not: the next run computes it afresh."""
        Store(self.store).rm(self.path)

    def committed(self, kind: type[AnyManifest]) -> AnyManifest | None:
        """The output's manifest read by the model `kind`, or None while it is not committed."""
        manifest = Store(self.store).manifest(self.path)
        return None if manifest is None else kind.from_json(manifest, self.ref().uri)


def located(stage: str, store: str, *inputs: Any, code: Sequence[ModuleType]) -> Location:
    """The location of `stage`'s output for `inputs` (JSON-able values and pydantic models)
    made by `code` (the modules whose source decides the output)."""
    fp = fingerprint(stage, *inputs, code_fingerprint(*code))
    return Location(store=store, path=f"{stage}/{fp}", fingerprint=fp)


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """The model as an input: its name and a digest of its files."""
    path = resolve_model_path(model.path)
    return {"path": model.path, "content": path_fingerprint(path)}


def hook_identity(model: ModelConfig) -> tuple[dict[str, Any], str, str]:
    """A hook's activations as an input: the model, the hook point and the dtype it ran in."""
    return model_identity(model), model.hook, model.dtype


def corpus_identity(corpus: str) -> str:
    """The corpus as an input: a digest of its local files, or its hub name."""
    resolved = resolve_corpus(corpus)
    return path_fingerprint(resolved) if isinstance(resolved, list) else resolved
