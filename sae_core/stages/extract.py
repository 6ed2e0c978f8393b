"""Stage `activations`: the hook's activations of every token context, as Parquet shards
(sae_core.data.activations).

Extraction is cut into shards, each a fixed range of contexts, so that they can run anywhere
(`extract_activation_shard`, one process or a Dask cluster) and an interrupted pass makes only
the shards it had not finished. `plan_activations` lists them, `commit_activations` writes the
manifests once every shard is marked done; `extract_hook_datasets` does all three here.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import DataConfig, ModelConfig
from sae_core.data import activations, compiled, models, pairing
from sae_core.data.activations import (
    ShardRange,
    activation_manifest,
    check_tokens,
    extract_shard,
    plan_shards,
    storage_dtype,
)
from sae_core.data.assets import resolve_model_path
from sae_core.data.compiled import CompiledForward
from sae_core.data.models import inspect_model, load_model
from sae_core.stages.location import Location, hook_identity, located
from sae_core.storage.manifests import ActivationsManifest, TokensManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import PROGRESS, DatasetWriter, Store

CODE = (activations, models, compiled)
_ACTIVATION_FIELDS = {
    "skip_first_position",
    "max_norm",
    "batch_tokens",
    "shard_mb",
    "shard_rows",
    "storage_dtype",
}


def locate_activations(tokens: DatasetRef, model: ModelConfig, data: DataConfig) -> Location:
    return located(
        "activations",
        tokens.store,
        tokens.fingerprint,
        *hook_identity(model),
        *(["compiled"] if model.compile else []),  # inductor's fused kernels round differently
        data.model_dump(include=_ACTIVATION_FIELDS),
        code=CODE,
    )


def extract_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    """model.hook's dataset, made in one pass with model.hook_out's when that is set."""
    return extract_hook_datasets(tokens, model, data, extracted_hooks(model), progress)[0]


def extracted_hooks(model: ModelConfig) -> list[str]:
    """The hooks one extraction pass writes: model.hook, and a transcoder's model.hook_out."""
    return [model.hook] + ([model.hook_out] if model.hook_out is not None else [])


def output_model(model: ModelConfig) -> ModelConfig:
    """`model` at a transcoder's output hook: what locates model.hook_out's dataset."""
    return model.model_copy(update={"hook": model.hook_out, "hook_out": None})


def locate_paired(
    acts: DatasetRef, tokens: DatasetRef, model: ModelConfig, data: DataConfig
) -> Location:
    """The dataset of a transcoder's output hook, paired with `acts` (model.hook's)."""
    return locate_activations(tokens, output_model(model), data)


def paired_activations(
    acts: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    progress: bool = True,
) -> DatasetRef:
    """model.hook_out's dataset, checked to pair with `acts` row for row
    (`sae_core.data.pairing`): made by the pass that made `acts`, or now if it is missing."""
    [out] = extract_hook_datasets(tokens, output_model(model), data, [model.hook_out], progress)
    pairing.check_pairing(acts, out)
    return out


class ActivationPlan(NamedTuple):
    """What an extraction has left to do: the datasets of `hooks` (each located as if it were
    `model.hook`), which of them are not committed (`todo`), every shard of a split, and the
    shards some `todo` dataset has not marked done (`missing`)."""

    tokens: DatasetRef
    model: ModelConfig
    data: DataConfig
    hooks: list[str]
    locations: list[Location]
    todo: list[int]
    shards: list[ShardRange]
    missing: list[ShardRange]


def plan_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, hooks: list[str]
) -> ActivationPlan:
    """Locate the hooks' datasets and list the shards still to make; reads configs and marks
    only (no weights). Clears what a killed attempt left half-written."""
    locs = [locate_activations(tokens, model.model_copy(update={"hook": h}), data) for h in hooks]
    store = Store(tokens.store)
    todo = []
    for i, loc in enumerate(locs):
        if not loc.is_committed():
            todo.append(i)
        else:  # marks of an attempt killed between its commit and their removal
            store.rm(f"{loc.path}/{PROGRESS}")
    shards: list[ShardRange] = []
    missing: list[ShardRange] = []
    if todo:
        facts = [inspect_model(model.path, hooks[i]) for i in todo][0]  # checks every hook
        src = check_tokens(tokens, data, facts.vocab_size)
        shards = plan_shards(src, data, facts.width, storage_dtype(model.dtype, data))
        done = []
        for i in todo:
            store.clear_temporaries(locs[i].path)
            writer = DatasetWriter(store, locs[i].path)
            done.append(writer.done_parts("train") | writer.done_parts("eval"))
        missing = [s for s in shards if any(s.part not in d for d in done)]
    return ActivationPlan(tokens, model, data, hooks, locs, todo, shards, missing)


_SHARD_LOCK = threading.Lock()  # one shard at a time per process: hooks live on the shared model


@functools.lru_cache(maxsize=1)
def _shard_model(path: str, dtype: str, device: str) -> Any:
    return load_model(resolve_model_path(path), dtype, device).model


@functools.lru_cache(maxsize=1)
def _shard_forward(
    path: str, dtype: str, device: str, hooks: tuple[str, ...], batch_rows: int
) -> CompiledForward:
    return CompiledForward(_shard_model(path, dtype, device), hooks, batch_rows)


def release_shard_model() -> None:
    """Free the model (and its compiled forward) `extract_activation_shard` keeps for the next
    shard."""
    _shard_forward.cache_clear()
    _shard_model.cache_clear()


def extract_activation_shard(plan: ActivationPlan, shard: ShardRange) -> ShardRange:
    """Make `shard` of every `todo` dataset that lacks it. The model is loaded once per process
    and kept for the next shard (`release_shard_model` frees it). Returns the shard."""
    stopping.check()  # a stopped run's queued shards end here, before loading the model
    store = Store(plan.tokens.store)
    writers = [DatasetWriter(store, plan.locations[i].path) for i in plan.todo]
    lacking = [
        (plan.hooks[i], w)
        for i, w in zip(plan.todo, writers, strict=True)
        if not w.is_done(shard.part)
    ]
    if lacking:
        with _SHARD_LOCK:
            m = plan.model
            model = _shard_model(m.path, m.dtype, m.device)
            hooks = tuple(h for h, _ in lacking)
            forward = None
            if m.compile:
                rows = max(
                    1, plan.data.batch_tokens // plan.tokens.manifest(TokensManifest).context_len
                )
                forward = _shard_forward(m.path, m.dtype, m.device, hooks, rows)
            extract_shard(
                model, plan.tokens, shard, plan.data, hooks, [w for _, w in lacking], forward
            )
    return shard


def commit_activations(plan: ActivationPlan) -> list[DatasetRef]:
    """Commit each `todo` dataset (its manifest from the shards' marks, written last); the
    references of every hook's dataset."""
    store = Store(plan.tokens.store)
    refs = []
    for i, loc in enumerate(plan.locations):
        if i in plan.todo:
            writer = DatasetWriter(store, loc.path)
            manifest = activation_manifest(
                writer, plan.tokens, plan.data, plan.hooks[i], plan.shards
            )
            store.commit(loc.path, manifest)
        else:
            manifest = loc.committed(ActivationsManifest)
        refs.append(loc.ref(manifest.splits["train"].rows))
    return refs


def extract_hook_datasets(
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    hooks: list[str],
    progress: bool = True,
) -> list[DatasetRef]:
    """One activations dataset per hook (each located as if it were `model.hook`), the missing
    ones from a single pass over the tokens in this process, shard by shard; an interrupted
    pass only makes the shards it had not finished."""
    plan = plan_activations(tokens, model, data, hooks)
    try:
        for shard in tqdm(plan.missing, desc="extract", unit="shard", disable=not progress):
            extract_activation_shard(plan, shard)
    finally:
        release_shard_model()
    return commit_activations(plan)
