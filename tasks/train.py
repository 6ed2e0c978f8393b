"""Prefect task: train an SAE on a committed activation dataset."""

from __future__ import annotations

from prefect import task

from sae_core import stages
from sae_core.config import SAEConfig, TrainConfig
from sae_core.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS


@task(name="train_sae", cache_policy=CommittedOutput(locate=stages.locate_sae), **TASK_DEFAULTS)
def train_sae(
    acts: DatasetRef, sae: SAEConfig, train: TrainConfig, progress: bool = True
) -> DatasetRef:
    return stages.train_sae(acts, sae, train, progress)
