"""A Matryoshka BatchTopK SAE through the whole flow (`saeflow run`'s pipeline) on the tiny
random Llama: trained, evaluated, registered as a loadable model and described for the viewer.

Slow (a full pipeline run): `.venv/bin/pytest -m slow tests/flows/test_pipeline_matryoshka.py`."""

from __future__ import annotations

import json
import math

import pytest

from sae_core.sae import MatryoshkaSAE, load_sae
from sae_core.storage.store import Store
from tests.helpers.pipeline import ALL_STAGES, run, tiny_config

pytestmark = pytest.mark.slow
PREFIXES = [16, 64, 256]


@pytest.fixture(scope="module")
def matryoshka_run(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("matryoshka-store"))
    config = tiny_config(
        tiny_llama_dir,
        tiny_corpus_dir,
        store,
        sae={"kind": "matryoshka", "matryoshka_prefixes": PREFIXES},
        registry={"model_name": "tiny-matryoshka"},
    )
    return store, run(config)


def test_every_stage_runs_and_the_sae_is_a_trained_matryoshka(matryoshka_run):
    store, result = matryoshka_run
    assert list(result.stages) == ALL_STAGES and set(result.stages.values()) == {"computed"}
    manifest = Store(store).manifest(result.sae.path)
    assert manifest["sae_kind"] == "matryoshka" and manifest["matryoshka_prefixes"] == PREFIXES
    assert manifest["batch_topk_threshold"] > 0
    sae = load_sae(result.sae)
    assert isinstance(sae, MatryoshkaSAE) and sae.sizes == tuple(PREFIXES)
    m = result.evaluation.metrics
    assert 0 < m["nmse"] < 1 and math.isfinite(m["ce_spliced"])


def test_the_registry_holds_it_with_its_resolved_prefixes(matryoshka_run):
    import mlflow

    from tasks.registry import registered_sae

    _, result = matryoshka_run
    reg = result.registry
    params = mlflow.MlflowClient(reg.tracking_uri).get_run(reg.run_id).data.params
    assert params["sae.kind"] == "matryoshka"
    assert params["sae.matryoshka_prefixes_resolved"] == str(PREFIXES)
    sae, _ = registered_sae(f"models:/tiny-matryoshka/{reg.version}")
    assert isinstance(sae, MatryoshkaSAE) and sae.sizes == tuple(PREFIXES)


def test_the_viewer_summary_carries_the_nesting(matryoshka_run):
    store, result = matryoshka_run
    summary = json.loads(Store(store).read_bytes(f"{result.latents.dataset.path}/summary.json"))
    assert summary["sae_kind"] == "matryoshka" and summary["matryoshka_prefixes"] == PREFIXES
