"""A skip transcoder through the whole flow (Prefect and MLflow) on the tiny random Llama: one
extraction pass for both hooks, the pairing checked, trained on (x, y), spliced in place of
the MLP's output, SAEBench's evaluations on its task (absorption skipped)."""

from __future__ import annotations

import math

import pytest

from sae_core.storage.manifests import SaeBenchManifest
from sae_core.storage.store import Store
from tasks.data import PAIRING_CHECKED
from tests.helpers.pipeline import ALL_STAGES, run, tiny_config

pytestmark = pytest.mark.slow

TRANSCODER = {
    "model": {"hook": "mlp_in.2", "hook_out": "mlp_out.2"},
    "sae": {"kind": "skip_transcoder", "normalize": "global"},
    "eval": {"ablation_samples": 0},
    "saebench": {"decoder_sample": 100},  # absorption asked for: skipped for a transcoder
}
STAGES = ALL_STAGES  # the pipeline's, with the pairing after validation


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def first_run(prefect, tiny_llama_dir, tiny_corpus_dir, local_store):
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, local_store, **TRANSCODER)
    return config, run(config)


def test_every_stage_runs_with_the_pairing_checked_after_validation(first_run):
    _, result = first_run
    paired = {"pair_activations": PAIRING_CHECKED, "validate_paired": "computed"}
    expected = {stage: "computed" for stage in STAGES[:3]} | paired
    assert result.stages == expected | {stage: "computed" for stage in STAGES[3:]}
    assert list(result.stages) == [*STAGES[:3], *paired, *STAGES[3:]]


def test_the_transcoder_trains_on_the_paired_datasets(first_run, local_store):
    config, result = first_run
    store = Store(local_store)
    sae = store.manifest(result.sae.path)
    acts_in = store.manifest(result.activations.path)
    acts_out = store.manifest(sae["activations_out"].removeprefix(local_store).strip("/"))
    assert sae["sae_kind"] == "skip_transcoder" and sae["activations"] == result.activations.uri
    assert (acts_in["hook"], acts_out["hook"]) == ("mlp_in.2", "mlp_out.2")
    assert acts_in["splits"]["train"]["rows"] == acts_out["splits"]["train"]["rows"]


def test_the_spliced_mlp_output_is_scored(first_run):
    _, result = first_run
    m = result.evaluation.metrics
    assert 0 < m["nmse"] < 1  # better than predicting y's mean
    assert 0 < m["l0"] <= 8
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "ce_loss_recovered"):
        assert math.isfinite(m[key])
    assert "ablation_sparsity" not in m


def test_saebench_scores_the_prediction_of_y_and_skips_absorption(first_run):
    _, result = first_run
    m = result.saebench.metrics
    assert m["explained_variance"] == pytest.approx(1 - result.evaluation.metrics["fvu"])
    assert 0 < m["alive_fraction"] <= 1 and "sparse_probe_acc_k1" in m
    assert not any(k.startswith("absorption") for k in m)
    skipped = result.saebench.dataset.manifest(SaeBenchManifest).skipped
    assert set(skipped) == {"absorption"}


def test_second_run_is_cached(first_run):
    config, _ = first_run
    assert set(run(config).stages.values()) == {"cached"}
