"""Prefect tasks for the data stages: corpus -> token contexts -> activations.

Extraction maps over shards: `extract_activations` (the cached stage) plans the shards still to
make, maps `extract_shard` over them on the flow's task runner (in this process one at a time by
default, on a Dask cluster with `--runner dask://HOST:PORT`) and commits the datasets once every
shard is marked done.
"""

from __future__ import annotations

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import DataConfig, ModelConfig
from sae_core.data.activations import ShardRange
from sae_core.stages import extract as extract_stage
from sae_core.stages import sample as sample_stage
from sae_core.storage.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS

PAIRING_CHECKED = (
    "pairing checked"  # pair_activations' outcome when the extraction made its dataset
)


@task(
    name="sample_tokens",
    cache_policy=CommittedOutput(locate=sample_stage.locate_tokens),
    **TASK_DEFAULTS,
)
def sample_tokens(
    store: str, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    return sample_stage.sample_tokens(store, model, data, progress)


# A shard's output is its file and mark on the store, which the next plan reads: nothing to cache.
@task(name="extract_shard", **{**TASK_DEFAULTS, "cache_policy": NO_CACHE, "persist_result": False})
def extract_shard(plan: extract_stage.ActivationPlan, shard: ShardRange) -> ShardRange:
    return extract_stage.extract_activation_shard(plan, shard)


@task(
    name="extract_activations",
    cache_policy=CommittedOutput(locate=extract_stage.locate_activations),
    **TASK_DEFAULTS,
)
def extract_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    # A transcoder's two hooks: one pass, paired datasets (`pair_activations` returns the second).
    plan = extract_stage.plan_activations(tokens, model, data, extract_stage.extracted_hooks(model))
    try:
        if plan.missing:
            futures = extract_shard.map(plan=unmapped(plan), shard=plan.missing)
            failures = []
            contexts = sum(s.stop - s.start for s in plan.missing)
            with tqdm(total=contexts, unit="ctx", desc="extract", disable=not progress) as bar:
                # Every shard ends before a failure is raised: none is left running behind.
                for future in as_completed(futures):
                    stopping.check()  # shards on Dask workers do not see this process's stop
                    try:
                        shard = future.result()
                    except Exception as err:  # noqa: BLE001 - raised once all have ended
                        failures.append(err)
                        continue
                    bar.update(shard.stop - shard.start)
            if failures:
                raise failures[0]
    finally:
        extract_stage.release_shard_model()  # this process's copy, when shards ran here
    return extract_stage.commit_activations(plan)[0]


@task(
    name="pair_activations",
    # The extraction made the dataset (both hooks in one pass): this stage checks the pairing.
    cache_policy=CommittedOutput(locate=extract_stage.locate_paired, reused=PAIRING_CHECKED),
    **TASK_DEFAULTS,
)
def pair_activations(
    acts: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    progress: bool = True,
) -> DatasetRef:
    """A transcoder's target: model.hook_out's dataset, checked to pair with `acts` row for row."""
    return extract_stage.paired_activations(acts, tokens, model, data, progress)
