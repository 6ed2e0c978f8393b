"""Prefect task: SAEBench's offline evaluations of a trained SAE (sae_core.stages.saebench)."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from sae_core.config import DataConfig, EvalConfig, ModelConfig, SaeBenchConfig
from sae_core.stages import saebench as saebench_stage
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
    dataset, metrics = saebench_stage.saebench_sae(
        sae, tokens, model, data, eval, saebench, progress
    )
    return SaeBenchRef(dataset=dataset, metrics=metrics)
