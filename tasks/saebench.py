"""Prefect task: SAEBench's offline evaluations of a trained SAE (sae_core.stages.saebench)."""

from __future__ import annotations

from prefect import get_run_logger, task
from pydantic import BaseModel

from sae_core.config import DataConfig, EvalConfig, ModelConfig, SaeBenchConfig
from sae_core.stages import saebench as saebench_stage
from sae_core.storage.manifests import SaeBenchManifest
from sae_core.storage.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS


class SaeBenchRef(BaseModel):
    """The committed SAEBench evaluation and its figures (a few floats)."""

    dataset: DatasetRef
    metrics: dict[str, float]


@task(
    name="saebench_sae",
    cache_policy=CommittedOutput(
        locate=saebench_stage.locate_saebench, forget=saebench_stage.remove_saebench
    ),
    **TASK_DEFAULTS,
)
def saebench_sae(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    saebench: SaeBenchConfig,
    progress: bool = True,
) -> SaeBenchRef:
    """An evaluation that does not apply to the SAE (a transcoder's absorption) is skipped: its
    reason is in the manifest's `skipped` and logged here."""
    dataset, metrics = saebench_stage.saebench_sae(
        sae, tokens, model, data, eval, saebench, progress
    )
    for evaluation, reason in dataset.manifest(SaeBenchManifest).skipped.items():
        get_run_logger().info("saebench: %s skipped: %s", evaluation, reason)
    return SaeBenchRef(dataset=dataset, metrics=metrics)
