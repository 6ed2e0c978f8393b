"""Prefect tasks for the data stages: corpus -> token contexts -> activations."""

from __future__ import annotations

from prefect import task

from sae_core import stages
from sae_core.config import DataConfig, ModelConfig
from sae_core.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS


@task(
    name="sample_tokens", cache_policy=CommittedOutput(locate=stages.locate_tokens), **TASK_DEFAULTS
)
def sample_tokens(
    store: str, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    return stages.sample_tokens(store, model, data, progress)


@task(
    name="extract_activations",
    cache_policy=CommittedOutput(locate=stages.locate_activations),
    **TASK_DEFAULTS,
)
def extract_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    return stages.extract_activations(tokens, model, data, progress)
