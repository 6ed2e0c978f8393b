"""The storage-fidelity frontier: the plan, the table's arithmetic, and the flow on the tiny
Llama (width 64) through Prefect with its report, plot, MLflow runs and cache."""

from __future__ import annotations

import math

import pytest

from sae_core.errors import ConfigError
from sae_core.storage.store import Store
from sae_core.studies.frontier import (
    FrontierRow,
    frontier_plan,
    frontier_summary,
    frontier_table,
    matched_latents,
)
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.pipeline import tiny_config

FRONTIER = {"degrees": [2, 8, 64], "seeds": [0]}
WIDTH = 64  # the tiny Llama's hidden size


def _config(tmp_path, tiny_llama_dir, tiny_corpus_dir, **frontier):
    return tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path), frontier=FRONTIER | frontier)


# The plan ---------------------------------------------------------------------------------------
def test_the_plan_is_dense_then_expanders_then_matched_per_seed(
    tmp_path, tiny_llama_dir, tiny_corpus_dir
):
    config = _config(tmp_path, tiny_llama_dir, tiny_corpus_dir, seeds=[0, 3])
    plan = frontier_plan(config, WIDTH)
    labels = [p.label for p in plan]
    assert labels[:6] == [
        "dense n=256 seed=0",
        "expander d=2 seed=0",
        "expander d=8 seed=0",
        "expander d=64 seed=0",
        "matched d=2 n=8 seed=0",
        "matched d=8 n=32 seed=0",
    ]  # d = 64 = width has no matched SAE: it would be the dense reference itself
    assert len(plan) == 12 and labels[6] == "dense n=256 seed=3"
    expander = plan[2].sae
    assert (expander.kind, expander.degree, expander.encoder, expander.mask_seed) == (
        "expander", 8, "tied", 0
    )  # fmt: skip
    assert plan[8].sae.mask_seed == 3 and plan[8].train.seed == 3
    matched = plan[4].sae
    assert (matched.kind, matched.n_latents, matched.k) == ("topk", 8, 8)  # k capped at n'
    assert plan[5].sae.k == 8  # n' = 32 >= k: the reference's k


def test_matched_latents_hold_as_many_decoder_values_as_the_expander():
    # The paper's Qwen2.5-3B rows: m = 2048, n = 16384; d = 102 -> 816, d = 30 -> 240.
    assert matched_latents(102, 16384, 2048) == 816
    assert matched_latents(30, 16384, 2048) == 240
    assert matched_latents(1, 100, 576) == 1


def test_a_degree_beyond_the_width_fails_before_any_work(tmp_path, tiny_llama_dir, tiny_corpus_dir):
    config = _config(tmp_path, tiny_llama_dir, tiny_corpus_dir, degrees=[2, 65])
    with pytest.raises(ConfigError, match=r"frontier.degrees=\[2, 65\]: \[65\] outside 1..64"):
        frontier_plan(config, WIDTH)
    assert_one_line_error(invoke("frontier", "--degrees", "2,2"), "frontier.degrees", "distinct")


def test_a_transcoder_is_refused_naming_sae_kind(tmp_path, tiny_llama_dir, tiny_corpus_dir):
    config = tiny_config(
        tiny_llama_dir, tiny_corpus_dir, str(tmp_path), frontier=FRONTIER,
        model={"hook": "mlp_in.2", "hook_out": "mlp_out.2"},
        sae={"kind": "skip_transcoder", "normalize": "global"}, saebench={"enabled": False},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="sae.kind=skip_transcoder has no expander form"):
        frontier_plan(config, WIDTH)


# The table --------------------------------------------------------------------------------------
def _row(family, degree, n, seed, ce, values, size, dead=0.0):
    metrics = {"ce_loss_recovered": ce, "dead_fraction": dead, "nmse": 0.2}
    return FrontierRow(family, degree, n, 8, seed, metrics, values, size)


def test_the_table_divides_by_the_dense_reference_of_the_same_seed():
    rows = [
        _row("dense", 64, 256, 0, 0.9, 256 * 64, 140_000),
        _row("expander", 2, 256, 0, 0.45, 256 * 2, 7_000, dead=0.25),
        _row("dense", 64, 256, 1, 0.8, 256 * 64, 140_000),
        _row("expander", 2, 256, 1, 0.6, 256 * 2, 7_000, dead=0.35),
        _row("matched", 2, 8, 0, 0.3, 8 * 64, 4_500),
    ]
    table = frontier_table(rows)
    assert [r["compression"] for r in table] == [1.0, 32.0, 1.0, 32.0, 32.0]
    assert table[1]["bytes_ratio"] == pytest.approx(20.0)
    assert [round(r["retained"], 6) for r in table] == [1.0, 0.5, 1.0, 0.75, round(0.3 / 0.9, 6)]
    summary = frontier_summary(table)
    assert [(s["family"], s["degree"], s["seeds"]) for s in summary] == [
        ("dense", 64, 2), ("expander", 2, 2), ("matched", 2, 1)
    ]  # fmt: skip
    expander = summary[1]
    assert expander["retained"] == pytest.approx(0.625)
    assert expander["retained_std"] == pytest.approx(math.sqrt(2) * 0.125)
    assert expander["dead_fraction"] == pytest.approx(0.3)
    assert summary[2]["retained_std"] == 0.0


def test_saebench_figures_become_columns_when_the_saes_have_them():
    plain = [_row("dense", 64, 256, 0, 0.9, 256 * 64, 140_000)]
    assert "absorption_full" not in frontier_table(plain)[0]
    benched = [
        FrontierRow("dense", 64, 256, 8, seed, {"ce_loss_recovered": 0.9, "absorption_full": a},
                    256 * 64, 140_000)
        for seed, a in ((0, 0.1), (1, 0.3))
    ]  # fmt: skip
    table = frontier_table(benched)
    assert [r["absorption_full"] for r in table] == [0.1, 0.3]
    assert "sparse_probe_acc_k1" not in table[0]  # only the figures some SAE has
    assert frontier_summary(table)[0]["absorption_full"] == pytest.approx(0.2)


def test_a_table_without_its_dense_reference_is_refused():
    with pytest.raises(ValueError, match=r"dense reference for seeds \[1\]"):
        frontier_table(
            [_row("dense", 64, 256, 0, 0.9, 1, 1), _row("expander", 2, 256, 1, 0.5, 1, 1)]
        )


# The flow ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traced(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path_factory):
    from flows.frontier import frontier

    config = _config(tmp_path_factory.mktemp("frontier-store"), tiny_llama_dir, tiny_corpus_dir)
    return config, frontier(config, progress=False)


def test_every_frontier_sae_is_trained_evaluated_and_tabulated(traced):
    _, result = traced
    assert [p.label for p in result.points] == [
        "dense n=256 seed=0", "expander d=2 seed=0", "expander d=8 seed=0",
        "expander d=64 seed=0", "matched d=2 n=8 seed=0", "matched d=8 n=32 seed=0",
    ]  # fmt: skip
    assert set(result.states.values()) == {"Completed / Completed / Completed"}
    table = {(r["family"], r["degree"]): r for r in result.table}
    dense_ce = table[("dense", 64)]["ce_loss_recovered"]
    for row in result.table:  # NaN throughout when zero-ablating the random model does not hurt
        assert row["retained"] == pytest.approx(row["ce_loss_recovered"] / dense_ce, nan_ok=True)
    assert table[("expander", 2)]["compression"] == 32.0
    assert table[("matched", 8)]["compression"] == pytest.approx(256 * 64 / (32 * 64))
    # The tied expander's artifact is compact: far smaller than the dense SAE's.
    assert table[("expander", 2)]["bytes_ratio"] > 10
    for row in result.table:
        assert 0 <= row["dead_fraction"] <= 1 and math.isfinite(row["nmse"])
    for p in result.points:  # the frontier reads CE recovered only: no probes, no ablations
        assert "probe_loss" not in p.metrics and "ablation_sparsity" not in p.metrics


def test_the_report_plot_and_mlflow_runs_exist(traced):
    import mlflow

    from tasks.tracking import tracking_uri

    _, result = traced
    ref = result.report.dataset
    store = Store(ref.store)
    assert store.read_bytes(f"{ref.path}/frontier.png")[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = store.read_bytes(f"{ref.path}/report.md").decode()
    assert "## Averaged over seeds" in markdown and "| expander | 8 |" in markdown
    client = mlflow.MlflowClient(tracking_uri())
    run = client.get_run(result.report.mlflow_run_id)
    assert "report/frontier.png" in {
        a.path for a in client.list_artifacts(run.info.run_id, "report")
    }
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 6
    expander = next(c for c in children if c.info.run_name == "expander-d=2-seed=0")
    assert expander.data.params["family"] == "expander"
    assert expander.data.metrics["compression"] == 32.0


def test_a_second_frontier_comes_from_the_cache(traced):
    from flows.frontier import frontier

    config, result = traced
    again = frontier(config, progress=False)
    assert set(again.states.values()) == {"Cached / Cached / Cached"}
    assert again.report.mlflow_run_id == result.report.mlflow_run_id
