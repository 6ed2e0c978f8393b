"""`saeflow view`: find the SAE a model version, run or store URI names, make sure its latent
statistics exist (computed once, then cached on the store), and hand back the viewer's site.

Plain functions, not a Prefect flow: viewing should start in seconds, and the statistics are
cached by the store itself. A registered SAE gets its explainability figures logged to its run.
"""

from __future__ import annotations

from typing import NamedTuple

from sae_core.config import LatentsConfig
from sae_core.latents.viewer import LatentSite
from sae_core.stages import latents as latents_stage
from tasks.latents import log_explainability, sae_for


class Prepared(NamedTuple):
    site: LatentSite
    metrics: dict[str, float]  # the explainability figures
    run_id: str | None  # the MLflow run they were logged to


def prepare(target: str, latents: LatentsConfig, progress: bool = True) -> Prepared:
    """The viewer's site for `target` (tasks.latents.TARGET_FORMS), computing the statistics
    when the store does not hold them yet."""
    sae, run_id = sae_for(target)
    dataset, metrics = latents_stage.compute_latent_stats(sae, latents, progress)
    if run_id is not None:
        log_explainability(run_id, dataset, metrics)
    return Prepared(LatentSite(dataset), metrics, run_id)
