"""Prefect tasks: train an SAE, or a group of SAEs from one read of the data, on a committed
activation dataset."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from sae_core.config import SAEConfig, TrainConfig
from sae_core.stages import train as train_stage
from sae_core.storage.refs import DatasetRef
from tasks.caching import CommittedOutput, stage_locks
from tasks.common import TASK_DEFAULTS


@task(
    name="train_sae",
    cache_policy=CommittedOutput(locate=train_stage.locate_sae, forget=train_stage.remove_sae),
    **TASK_DEFAULTS,
)
def train_sae(
    acts: DatasetRef,
    sae: SAEConfig,
    train: TrainConfig,
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> DatasetRef:
    """acts_out: a transcoder's target dataset (`pair_activations`)."""
    return train_stage.train_sae(acts, sae, train, progress, acts_out)


# Not cached itself: each SAE lands at the address a lone `train_sae` uses, where that task's
# per-point cache (and the stage's skipping of committed SAEs) finds it.
@task(name="train_sae_group", cache_policy=NO_CACHE, **TASK_DEFAULTS)
def train_sae_group(
    acts: DatasetRef,
    points: list[tuple[SAEConfig, TrainConfig]],
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> list[DatasetRef]:
    """points must share `sae_core.training.group.data_order`; one ref per point, in order.
    acts_out: the transcoders' target dataset (`pair_activations`)."""
    return train_stage.train_sae_group(acts, points, progress, acts_out)


def train_group_stage(
    acts: DatasetRef,
    points: list[tuple[SAEConfig, TrainConfig]],
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> None:
    """Train the points' SAEs that are not committed yet in one `train_sae_group` run, holding
    each one's stage lock (as `run_stage` would for a lone `train_sae`), so a concurrent run of
    any of them waits and then reuses it. Nothing runs when all are committed.
    acts_out: the transcoders' target dataset (`pair_activations`)."""
    locations = {train_stage.locate_sae(acts, *p, acts_out): p for p in points}
    missing = {loc: p for loc, p in locations.items() if not loc.is_committed()}
    if missing:
        with stage_locks(missing, "train_sae_group"):
            train_sae_group(acts, list(missing.values()), progress, acts_out)
