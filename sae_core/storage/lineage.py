"""Where a trained SAE came from, read back from the manifests on the store."""

from __future__ import annotations

from typing import NamedTuple

from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef


class Lineage(NamedTuple):
    """The activations an SAE was trained on, the token dataset behind them, and their source."""

    activations: DatasetRef
    tokens: DatasetRef
    model: str  # the language model's path or name as extraction recorded it
    hook: str  # e.g. resid_post.15
    context_len: int | None
    skip_first_position: bool | None  # position 0 of every context left out


def sae_lineage(sae: DatasetRef) -> Lineage:
    """Follow the sae manifest to its activations manifest (same store). Raises
    FileNotFoundError when either is gone, DatasetDamaged when either does not say."""
    store = sae.open_store()
    acts_path = sae.manifest(SaeManifest).activations.removeprefix(f"{store.uri}/")
    acts = DatasetRef(store=store.uri, path=acts_path, fingerprint="")
    manifest = acts.manifest(ActivationsManifest).recorded("fingerprint", "tokens", "model", "hook")
    return Lineage(
        activations=DatasetRef(
            store=store.uri,
            path=acts_path,
            fingerprint=manifest.fingerprint,
            rows=sum(split.rows for split in manifest.splits.values()),
        ),
        tokens=DatasetRef(
            store=store.uri,
            path=manifest.tokens.uri.removeprefix(f"{store.uri}/"),
            fingerprint=manifest.tokens.fingerprint,
        ),
        model=manifest.model,
        hook=manifest.hook,
        context_len=manifest.context_len,
        skip_first_position=manifest.skip_first_position,
    )
