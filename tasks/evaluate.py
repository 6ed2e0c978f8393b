"""Prefect task: evaluate a trained SAE on the eval split."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from sae_core.config import DataConfig, EvalConfig, ModelConfig
from sae_core.stages import evaluate as evaluate_stage
from sae_core.storage.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS


class EvalRef(BaseModel):
    """The committed evaluation and its headline figures (a few floats)."""

    dataset: DatasetRef
    metrics: dict[str, float]


@task(
    name="evaluate_sae",
    cache_policy=CommittedOutput(
        locate=evaluate_stage.locate_evaluation, forget=evaluate_stage.remove_evaluation
    ),
    **TASK_DEFAULTS,
)
def evaluate_sae(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    progress: bool = True,
) -> EvalRef:
    dataset, metrics = evaluate_stage.evaluate_sae(sae, tokens, model, data, eval, progress)
    return EvalRef(dataset=dataset, metrics=metrics)
