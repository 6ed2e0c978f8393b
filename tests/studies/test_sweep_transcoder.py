"""A 2 x 2 grid of skip transcoders on the tiny Llama through Prefect: the paired datasets of one
extraction pass, every point trained on (x, y) from one read of the data and scored on its output
hook, the scaling law fitted to the NMSE of y, and the report's rows naming the kind."""

from __future__ import annotations

import math

import pytest

from sae_core.storage.store import Store
from sae_core.studies.report import TRANSCODER_NOTE
from tests.helpers.pipeline import sweep_counting_reads, tiny_config

TRANSCODER = {
    "model": {"hook": "mlp_in.2", "hook_out": "mlp_out.2"},
    "sae": {"kind": "skip_transcoder", "normalize": "global"},
    "sweep": {"n_latents": [64, 128], "k": [4, 8], "seeds": [0]},
    "eval": {"ablation_samples": 0, "probe_contexts": 0},  # SAEBench: core metrics only
}


@pytest.fixture(scope="module")
def swept(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("tc-sweep-store"))
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, store, **TRANSCODER)
    return (config, *sweep_counting_reads(config))


def test_every_point_trains_on_the_paired_datasets_from_one_read(swept):
    config, result, reads = swept
    # The initialisation sample, then one epoch streamed (x and y side by side) for all 4.
    assert len(reads) == 2 and reads[1] == (config.train.batch_size, 0, 0)
    store = Store(result.activations.store)
    hooks = [store.manifest(r.path)["hook"] for r in (result.activations, result.activations_out)]
    assert hooks == ["mlp_in.2", "mlp_out.2"]
    for p in result.points:
        sae = store.manifest(p.sae.path)
        assert (sae["sae_kind"], sae["n"], sae["k"]) == ("skip_transcoder", p.n, p.k)
        assert sae["activations_out"] == result.activations_out.uri


def test_every_point_is_scored_on_its_output_hook(swept):
    _, result, _ = swept
    assert [(p.n, p.k, p.kind) for p in result.points] == [
        (64, 4, "skip_transcoder"), (64, 8, "skip_transcoder"),
        (128, 4, "skip_transcoder"), (128, 8, "skip_transcoder"),
    ]  # fmt: skip
    assert set(result.states.values()) == {"Completed / Completed / Completed"}
    store = Store(result.activations.store)
    for p in result.points:
        m = p.metrics
        assert 0 < m["nmse"] < 2 and 0 < m["l0"] <= p.k
        for key in ("ce_clean", "ce_spliced", "kl_spliced", "ce_loss_recovered"):
            assert math.isfinite(m[key]), key
        assert "ablation_sparsity" not in m  # a transcoder has no single-latent ablation
        # SAEBench's core metrics on the same task: y against the prediction; no absorption.
        assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
        assert not any(k.startswith("absorption") for k in m)
        # The evaluation's baseline is the output hook's: y is what nmse measures.
        baseline = store.manifest(p.evaluation.path)["baseline"]
        assert store.manifest(baseline.removeprefix(store.uri).strip("/"))["hook"] == "mlp_out.2"
    assert result.fit is not None and result.fit.points == 4


def test_the_report_rows_carry_the_kind_and_the_nmse_of_y(swept):
    _, result, _ = swept
    ref = result.report.dataset
    store = Store(ref.store)
    table = store.read_json(f"{ref.path}/table.json")
    by_point = {(p.n, p.k): p.metrics for p in result.points}
    assert len(table) == 4
    for row in table:
        assert row["kind"] == "skip_transcoder"
        assert "ablation_sparsity" not in row  # measured for no SAE of the grid
        assert row["nmse"] == by_point[(row["n"], row["k"])]["nmse"]
    markdown = store.read_bytes(f"{ref.path}/report.md").decode()
    assert "mlp_in.2 -> mlp_out.2" in markdown and TRANSCODER_NOTE in markdown
    assert "## Scaling law" in markdown


def test_a_second_sweep_comes_from_the_cache(swept):
    from flows.sweep import sweep

    config, result, _ = swept
    again = sweep(config, progress=False)
    assert set(again.states.values()) == {"Cached / Cached / Cached"}
    assert again.report.dataset == result.report.dataset
