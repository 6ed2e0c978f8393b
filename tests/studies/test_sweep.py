"""A 2 x 2 sweep on the tiny Llama through Prefect: cached stages, the fit, report and plots."""

from __future__ import annotations

import math

import pytest

from sae_core.errors import ConfigError
from sae_core.storage.store import Store
from sae_core.studies.report import sweep_report
from sae_core.studies.scaling import NAMES
from sae_core.studies.sweep import SweepRow, grid
from tests.helpers.activations import count_train_reads
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.pipeline import sweep_counting_reads, tiny_config

SWEEP = {"n_latents": [64, 128], "k": [4, 8], "seeds": [0]}
EVAL = {"ablation_samples": 8, "ablation_horizon": 4, "probe_contexts": 60, "probe_tokens": 256}
FIGURES = ["nmse_vs_l0.png", "ce_recovered_vs_l0.png", "nmse_vs_n.png", "dead_vs_n.png",
           "training_curves.png"]  # fmt: skip


@pytest.fixture(scope="module")
def swept(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("sweep-store"))
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, store, sweep=SWEEP, eval=EVAL)
    return (config, *sweep_counting_reads(config))


def test_the_grid_trains_from_one_read_of_the_data(swept):
    config, _, reads = swept
    # One group (one seed): the initialisation sample, then one epoch streamed for all 4 SAEs.
    assert len(reads) == 2 and reads[1] == (config.train.batch_size, 0, 0)


def test_every_grid_point_is_trained_evaluated_and_fitted(swept):
    _, result, _ = swept
    assert [(p.n, p.k) for p in result.points] == [(64, 4), (64, 8), (128, 4), (128, 8)]
    assert set(result.states.values()) == {"Completed / Completed / Completed"}
    for p in result.points:
        assert 0 < p.metrics["nmse"] < 2 and p.metrics["l0"] <= p.k
        assert "probe_loss" in p.metrics and "ablation_sparsity" in p.metrics
        assert {"explained_variance", "sparse_probe_acc_k1", "absorption_letters"} <= set(p.metrics)
    assert result.fit is not None and result.fit.points == 4
    assert list(result.fit.params) == list(NAMES)
    assert all(math.isfinite(v) for v in result.fit.params.values())
    # Every point shares one baseline and one probe set: the model's lower part ran once.
    evals = [Store(p.evaluation.store).manifest(p.evaluation.path) for p in result.points]
    assert len({e["baseline"] for e in evals}) == 1 and len({e["probe_set"] for e in evals}) == 1


def test_report_plots_and_artifacts_exist(swept):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, result, _ = swept
    ref = result.report.dataset
    store = Store(ref.store)
    for name in ["report.md", "table.json", *FIGURES]:
        assert store.exists(f"{ref.path}/{name}"), name
    for name in FIGURES:
        assert store.read_bytes(f"{ref.path}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = store.read_bytes(f"{ref.path}/report.md").decode()
    metrics, convergence = markdown.split("## Tokens to convergence")
    assert "## Scaling law" in metrics and metrics.count("\n| 128 |") == 2
    assert convergence.count("\n| 128 |") == 2 and "per doubling" in convergence
    assert "| explained_variance |" in markdown and "SAEBench" in markdown
    with get_client(sync_client=True) as client:
        for key in ("saeflow-sweep-report", "saeflow-sweep-report-table"):
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            assert found, key
    from tasks.tracking import tracking_uri

    mlflow_client = mlflow.MlflowClient(tracking_uri())
    run = mlflow_client.get_run(result.report.mlflow_run_id)
    assert set(run.data.metrics) >= {f"fit/{name}" for name in NAMES}
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "report")}
    assert "report/nmse_vs_n.png" in artifacts
    children = mlflow_client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 4


def test_a_second_sweep_comes_from_the_cache(swept):
    from flows.sweep import sweep

    config, result, _ = swept
    with pytest.MonkeyPatch.context() as patch:
        reads = count_train_reads(patch)
        again = sweep(config, progress=False)
    assert set(again.states.values()) == {"Cached / Cached / Cached"}
    assert reads == []  # nothing trained, nothing read
    assert again.report.dataset == result.report.dataset
    assert again.report.mlflow_run_id == result.report.mlflow_run_id


def test_a_bad_grid_fails_in_one_line():
    assert_one_line_error(invoke("sweep", "--n", "64,128", "--k", "8,200"), "sweep", "k=[8, 200]")
    assert_one_line_error(invoke("sweep", "--k", "8,8"), "sweep", "distinct")


def test_grid_names_the_point_that_is_not_a_valid_sae(tiny_llama_dir, tiny_corpus_dir, tmp_path):
    config = tiny_config(
        tiny_llama_dir, tiny_corpus_dir, str(tmp_path), sweep={"n_latents": [64], "k": [32]},
        sae={"multi_topk": True},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="sweep point n=64, k=32: sae.multi_topk"):
        grid(config)


def test_a_run_report_lists_metrics_probes_and_figures(swept):
    from sae_core.stages.report import write_run_report

    _, result, _ = swept
    point = result.points[-1]
    written = write_run_report(point.sae, point.evaluation, "tiny run")
    store = Store(written.ref.store)
    for name in ("report.md", "training_curves.png", "latent_density.png"):
        assert store.exists(f"{written.ref.path}/{name}"), name
    assert {row["metric"] for row in written.table} >= {"nmse", "fvu", "kl_spliced", "probe_loss"}
    assert "## Probe tasks" in written.markdown and "genre=news" in written.markdown
    again = write_run_report(point.sae, point.evaluation, "tiny run")
    assert again.markdown == written.markdown  # read back from the store, not redrawn


def test_tokens_grow_with_n_by_the_sweeps_exponent(tiny_llama_dir, tiny_corpus_dir, tmp_path):
    config = tiny_config(
        tiny_llama_dir, tiny_corpus_dir, str(tmp_path),
        sweep={"n_latents": [64, 256], "k": [4], "tokens_exponent": 0.5},
        train={"batch_size": 100, "tokens": 1000},
    )  # fmt: skip
    tokens = {p.n: p.train.tokens for p in grid(config)}
    assert tokens == {64: 1000, 256: 2000}  # (256 / 64)^0.5 = 2, in whole batches
    unset = config.model_copy(update={"train": config.train.model_copy(update={"tokens": None})})
    with pytest.raises(ConfigError, match="set train.tokens"):
        grid(unset)


def test_a_metric_no_sae_measured_is_left_out_and_a_missing_one_is_na():
    base = {"nmse": 0.3, "fvu": 0.1, "l0": 4.0, "dead_fraction": 0.0, "ce_loss_recovered": 0.9,
            "kl_spliced": 0.2}  # fmt: skip
    rows = [
        SweepRow(64, 4, 0, "topk", base | {"ablation_sparsity": 0.4}, 0.0),
        SweepRow(128, 4, 0, "topk", base, 0.0),
    ]
    curve = [{"tokens": t, "nmse": 0.5 / t, "dead_fraction": 0.0} for t in (1, 2)]
    report = sweep_report("t", rows, None, [(r.label, curve) for r in rows])
    assert "probe_loss" not in report.markdown and all("probe_loss" not in r for r in report.table)
    assert [r["ablation_sparsity"] for r in report.table] == [0.4, None]
    row = "| 128 | 4 | 0 | topk | 0.3 | 0.1 | 4 | 0 | 0.9 | 0.2 | n/a | 0 |"
    assert row in report.markdown.splitlines()
