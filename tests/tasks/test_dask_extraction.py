"""Extraction mapped over shards through Prefect task runners: on a Dask LocalCluster of two
worker processes it writes the same dataset, byte for byte, as a single process; a half-done
extraction only makes its missing shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow

from flows.runners import local_runner
from sae_core.config import DataConfig, ModelConfig
from sae_core.stages import extract as extract_stage
from sae_core.stages import sample as sample_stage
from sae_core.storage.store import Store
from tasks.caching import run_stage
from tasks.data import extract_activations

DATA = {"context_len": 16, "train_tokens": 640, "eval_tokens": 160, "batch_tokens": 64,
        "shard_rows": 100}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, tiny_corpus_dir):
    """A store with the tiny model's tokens: (store, tokens ref, model config, data config)."""
    store = Store(str(tmp_path_factory.mktemp("dask") / "store"))
    model = ModelConfig(path=str(tiny_llama_dir), hook="resid_post.2", device="cpu")
    data = DataConfig(corpus=str(tiny_corpus_dir), **DATA)
    tokens = sample_stage.sample_tokens(store.uri, model, data, progress=False)
    return store, tokens, model, data


def _files(store: Store, path: str) -> dict[str, bytes]:
    """Every file of a dataset folder, manifest included: {name: bytes}."""
    root = Path(store.path(path))
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def single(setup):
    """The single-process extraction's files, and its folder emptied for the next extraction."""
    store, tokens, model, data = setup
    ref = extract_stage.extract_activations(tokens, model, data, progress=False)
    files = _files(store, ref.path)
    store.rm(ref.path)
    return ref, files


def _extract_with(task_runner, setup):
    _, tokens, model, data = setup

    @flow(task_runner=task_runner)
    def extraction():
        # As the flows call it: a cache entry whose output is gone from the store is refreshed.
        state = run_stage(
            extract_activations, tokens=tokens, model=model, data=data, progress=False
        )
        return state.result()

    return extraction()


def _make_first_shards(setup, n: int) -> tuple[extract_stage.ActivationPlan, dict[str, int]]:
    """Make the first `n` shards in this process, as a killed attempt leaves them: (the plan
    before, {file: inode})."""
    store, tokens, model, data = setup
    plan = extract_stage.plan_activations(tokens, model, data, [model.hook])
    try:
        for shard in plan.missing[:n]:
            extract_stage.extract_activation_shard(plan, shard)
    finally:
        extract_stage.release_shard_model()
    folder = Path(store.path(plan.locations[0].path))
    return plan, {s.name: (folder / s.name).stat().st_ino for s in plan.missing[:n]}


def test_half_done_extraction_makes_only_its_missing_shards(prefect, setup, single, monkeypatch):
    store, tokens, model, data = setup
    ref, expected = single
    plan, _ = _make_first_shards(setup, 3)
    made = []
    extract_shard = extract_stage.extract_activation_shard

    def spy(plan, shard):
        made.append(shard.name)
        return extract_shard(plan, shard)

    monkeypatch.setattr(extract_stage, "extract_activation_shard", spy)
    try:
        assert _extract_with(local_runner(), setup) == ref
        everything = [s.name for s in plan.shards]
        assert sorted(made) == sorted(everything[3:]) and len(everything) == 9
        assert _files(store, ref.path) == expected
        # A committed dataset is reused without any shard work.
        made.clear()
        assert _extract_with(local_runner(), setup) == ref and made == []
    finally:
        store.rm(ref.path)


@pytest.mark.slow  # ~25 s of cluster start and stop on two cores; the quick variants: the test
# above and test_activations.py::test_a_shard_is_the_same_bytes_whatever_the_order_and_threads
def test_a_dask_cluster_extracts_the_same_dataset_as_one_process(prefect, setup, single):
    """Two worker processes (one thread each, where this process runs torch on all cores)
    make the shards a killed attempt left undone; the dataset equals the single-process one."""
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    store, tokens, model, data = setup
    ref, expected = single
    _, made_before = _make_first_shards(setup, 2)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert _extract_with(DaskTaskRunner(address=cluster.scheduler_address), setup) == ref
        # Each worker process loaded the model once and kept it for its next shard.
        loaded = client.run(lambda: extract_stage._shard_model.cache_info().currsize)
    assert sorted(loaded.values()) == [1, 1], loaded
    folder = Path(store.path(ref.path))
    assert {name: (folder / name).stat().st_ino for name in made_before} == made_before
    assert _files(store, ref.path) == expected
