"""Stage `latents`: the viewer's dataset for a trained SAE (sae_core.latents): each latent's
statistics, top and random contexts, logit lens and explanation, and the explainability
figures, from one pass over the eval activations of its lineage."""

from __future__ import annotations

import time

from sae_core.config import LatentsConfig
from sae_core.data.assets import resolve_model_path
from sae_core.data.models import load_model
from sae_core.errors import ConfigError
from sae_core.latents import explain, logit_lens, pages, stats, streaming
from sae_core.latents.logit_lens import Unembedding
from sae_core.sae import MatryoshkaSAE, base, load_sae
from sae_core.stages.location import Location, located
from sae_core.storage import loader
from sae_core.storage.fingerprint import path_fingerprint
from sae_core.storage.lineage import sae_lineage
from sae_core.storage.manifests import LatentStatsManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

CODE = (stats, pages, streaming, explain, logit_lens, loader, base)


def _lineage_model(sae: DatasetRef) -> str:
    """The model the SAE's activations came from, loadable here (a ConfigError if it is not)."""

    recorded = sae_lineage(sae).model
    try:
        return resolve_model_path(recorded)
    except ConfigError:
        raise ConfigError(
            f"latent statistics of {sae.uri}: its model {recorded!r} (from the activations "
            "manifest) is not on this machine; compute them where the SAE was trained"
        ) from None


def locate_latent_stats(sae: DatasetRef, latents: LatentsConfig) -> Location:
    return located(
        "latents",
        sae.store,
        sae.fingerprint,
        path_fingerprint(_lineage_model(sae)),  # content, not the name it was loaded by
        latents,
        code=CODE,
    )


def compute_latent_stats(
    sae: DatasetRef, latents: LatentsConfig, progress: bool = True
) -> tuple[DatasetRef, dict[str, float]]:
    """The viewer's dataset for a trained SAE (sae_core.latents.stats): statistics, contexts,
    logit lens and explanations from one pass over its eval activations; returns (ref, the
    explainability figures). The logit lens reads the model the activations came from."""
    loc = locate_latent_stats(sae, latents)
    if (manifest := loc.committed(LatentStatsManifest)) is None:
        started = time.perf_counter()
        lineage = sae_lineage(sae)
        loaded = load_model(_lineage_model(sae), "float32", "cpu")
        autoencoder, unembed = load_sae(sae), Unembedding.from_model(loaded.model)
        found = stats.latent_statistics(
            autoencoder, lineage.activations, unembed, latents, progress
        )
        about = {
            "sae": sae.uri,
            "sae_kind": autoencoder.cfg.kind,
            "d": autoencoder.d,
            "k": autoencoder.k,
            "model": lineage.model,
            "hook": lineage.hook,
            "activations": lineage.activations.uri,
        }
        if isinstance(autoencoder, MatryoshkaSAE):  # the viewer shows each latent's level
            about["matryoshka_prefixes"] = list(autoencoder.sizes)
        with Store(sae.store).writing(loc.path) as writer:
            summary = pages.write_latent_dataset(
                found,
                lambda ids: loaded.tokenizer.batch_decode([[i] for i in ids]),
                writer,
                about,
                latents,
                progress,
            )
            manifest = LatentStatsManifest(
                fingerprint=loc.fingerprint,
                **about,
                n_latents=autoencoder.n_latents,
                metrics=pages.explainability_metrics(summary["explainability"]),
                seconds=time.perf_counter() - started,
            )
            writer.manifest = manifest
    return loc.ref(manifest.n_latents), manifest.metrics
