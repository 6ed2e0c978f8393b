"""The whole flow on a tiny random Llama and a generated corpus, through Prefect and MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sae_core.storage.store import Store
from tests.helpers.pipeline import ALL_STAGES, run, tiny_config


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def first_run(prefect, tiny_llama_dir, tiny_corpus_dir, local_store):
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, local_store)
    return config, run(config)


def test_first_run_computes_every_stage(first_run):
    _, result = first_run
    assert list(result.stages) == ALL_STAGES
    assert set(result.stages.values()) == {"computed"}


def test_outputs_are_committed_with_manifests(first_run, local_store):
    config, result = first_run
    store = Store(local_store)
    tokens = store.manifest(result.tokens.path)
    acts = store.manifest(result.activations.path)
    sae = store.manifest(result.sae.path)
    assert tokens["splits"]["train"]["tokens"] >= 4096
    assert acts["width"] == 64 and acts["hook"] == "resid_post.2"
    # Position 0 of every context is skipped, so 31 of 32 tokens per context are kept.
    assert acts["splits"]["train"]["rows"] == tokens["splits"]["train"]["contexts"] * 31
    assert (
        sum(s["rows"] for s in acts["splits"]["train"]["shards"]) == acts["splits"]["train"]["rows"]
    )
    assert sae["tokens_seen"] > 0
    assert store.exists(f"{result.sae.path}/sae.safetensors")
    all_rows = sum(split["rows"] for split in acts["splits"].values())
    assert result.validation.passed and result.validation.rows == all_rows


def test_metrics_are_in_plausible_ranges(first_run):
    _, result = first_run
    m = result.evaluation.metrics
    assert 0 < m["nmse"] < 1  # better than predicting the mean
    assert 0 < m["l0"] <= 8
    assert 0 <= m["dead_fraction"] < 1
    for key in ("ce_clean", "ce_spliced", "ce_zero"):
        assert math.isfinite(m[key]) and m[key] > 0
    assert m["delta_lm_loss"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
    assert m["eval_tokens"] == pytest.approx(16 * 31)


def test_registry_holds_the_version_with_its_alias(first_run):
    import mlflow

    _, result = first_run
    reg = result.registry
    client = mlflow.MlflowClient(reg.tracking_uri)
    version = client.get_model_version_by_alias("tiny-sae", "challenger")
    assert str(version.version) == reg.version
    assert result.nomination.moved and result.nomination.before is None
    run = client.get_run(reg.run_id)
    assert run.data.metrics["nmse"] == pytest.approx(result.evaluation.metrics["nmse"])
    assert run.data.params["sae.k"] == "8"
    # What `auto` became, beside the configured value.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert run.data.params["train.device"] == run.data.params["model.device"] == "auto"
    assert run.data.params["train.device_resolved"] == device
    assert run.data.params["model.device_resolved"] == device
    assert run.data.params["train.dtype_resolved"] == run.data.params["model.dtype_resolved"]
    assert run.data.params["model.dtype_resolved"] == "float32"
    assert {a.path for a in client.list_artifacts(reg.run_id, "sae")} >= {"sae/history.json"}
    # The weights travel in the pickle-free pyfunc model (tests/flows/test_operations.py loads it).
    model = mlflow.artifacts.download_artifacts(f"models:/tiny-sae/{reg.version}")
    files = [p.name for p in Path(model).rglob("*") if p.is_file()]
    assert "sae.safetensors" in files
    assert not any(f.endswith((".pkl", ".pickle")) or "cloudpickle" in f for f in files)


def test_second_run_is_cached_and_registers_nothing_new(first_run):
    config, result = first_run
    again = run(config)
    assert set(again.stages.values()) == {"cached"}, again.stages
    assert again.registry.version == result.registry.version
    assert again.evaluation.metrics == pytest.approx(result.evaluation.metrics, nan_ok=True)


def test_changing_the_sae_reruns_only_train_evaluate_register(
    first_run, tiny_llama_dir, tiny_corpus_dir, local_store
):
    config, result = first_run
    changed = run(tiny_config(tiny_llama_dir, tiny_corpus_dir, local_store, sae={"k": 16}))
    assert [s for s, state in changed.stages.items() if state != "cached"] == [
        "train_sae",
        "evaluate_sae",
        "saebench_sae",
        "register_model",
        "latent_stats",
        "report_run",
    ]
    assert changed.sae.path != result.sae.path
    assert int(changed.registry.version) == int(result.registry.version) + 1
    assert changed.nomination.after == changed.registry.version  # the new version: challenger


def test_a_run_with_another_prefect_cache_reuses_the_store_and_keeps_the_newest_challenger(
    first_run, tiny_llama_dir, tiny_corpus_dir, local_store, tmp_path
):
    """Another state directory on the same store and registry (here: another Prefect result
    storage, where the cache lives): every stage runs, finds its output and says so; the older
    version it finds registered does not take `challenger` back."""
    import mlflow
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    config, result = first_run
    client = mlflow.MlflowClient(result.registry.tracking_uri)
    newest = max(int(v.version) for v in client.search_model_versions("name = 'tiny-sae'"))
    assert newest > int(result.registry.version)  # the k=16 run above registered it
    client.set_registered_model_alias("tiny-sae", "challenger", str(newest))
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        other = run(config)
    reused = dict.fromkeys(ALL_STAGES, "reused from the store")
    assert other.stages == reused | {"register_model": "reused from the registry"}
    assert other.registry.version == result.registry.version
    assert not other.nomination.moved and other.nomination.after == str(newest)
    challenger = client.get_model_version_by_alias("tiny-sae", "challenger")
    assert str(challenger.version) == str(newest)
    # A cached re-run reconciles too: with the alias moved by hand, the newest version's
    # configuration, all from Prefect's cache, takes it back.
    client.set_registered_model_alias("tiny-sae", "challenger", result.registry.version)
    cached = run(tiny_config(tiny_llama_dir, tiny_corpus_dir, local_store, sae={"k": 16}))
    assert set(cached.stages.values()) == {"cached"}, cached.stages
    assert cached.nomination.moved and cached.nomination.after == str(newest)


def test_deleted_output_is_recomputed_not_served_from_cache(first_run, local_store):
    config, result = first_run
    store = Store(local_store)
    store.rm(result.sae.path)
    again = run(config)
    assert again.stages["train_sae"] == "computed"
    assert store.is_committed(result.sae.path)
    assert again.sae == result.sae
    # Downstream stages see the same SAE fingerprint, so they stay cached.
    assert again.stages["evaluate_sae"] == "cached"


def test_explainability_is_logged_to_the_registered_run(first_run):
    import mlflow

    _, result = first_run
    run = mlflow.MlflowClient(result.registry.tracking_uri).get_run(result.registry.run_id)
    for key in ("explain/precision_mean", "explain/recall_mean", "explain/f1_mean"):
        assert run.data.metrics[key] == pytest.approx(result.latents.metrics[key])
    assert run.data.tags["saeflow.latents_uri"] == result.latents.dataset.uri


def test_view_targets_resolve_through_the_registry(first_run):
    import mlflow

    from sae_core.errors import ConfigError
    from tasks.latents import sae_for

    _, result = first_run
    reg = result.registry
    client = mlflow.MlflowClient(reg.tracking_uri)
    client.set_registered_model_alias("tiny-sae", "viewing", reg.version)  # others move
    expected = (result.sae.uri, reg.run_id)
    targets = ("tiny-sae@viewing", f"models:/tiny-sae/{reg.version}", reg.run_id)
    for target in (*targets, f"runs:/{reg.run_id}"):
        ref, run_id = sae_for(target)
        assert (ref.uri, run_id) == expected, target
    latest = max(client.search_model_versions("name = 'tiny-sae'"), key=lambda v: int(v.version))
    assert sae_for("tiny-sae")[1] == latest.run_id  # a bare name: the latest version
    with pytest.raises(ConfigError, match="nosuch.*registered models: .*tiny-sae"):
        sae_for("nosuch@champion")


def test_ls_lists_the_datasets_with_lineage_and_the_versions_using_them(first_run, local_store):
    from typer.testing import CliRunner

    from flows.cli import app

    _, result = first_run
    listed = CliRunner().invoke(app, ["ls", local_store], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if "│" in line}
    version = f"tiny-sae v{result.registry.version}"
    for ref in (result.sae, result.activations, result.tokens, result.evaluation.dataset):
        assert version in rows[ref.path], rows.get(ref.path)  # used directly or as its input
    assert result.activations.path in rows[result.sae.path]  # what the SAE was made from
    assert "checkpoints/" not in listed.output  # the checkpoint went with the SAE's commit


def test_gc_removes_what_nothing_needs_and_never_a_registered_versions_data(first_run, local_store):
    """Garbage of each kind, and a registered version's dataset made to look like garbage (its
    manifest gone, as while it is recomputed): gc removes the first, never the second."""
    from typer.testing import CliRunner

    from flows.cli import app
    from sae_core.env import saeflow_home
    from sae_core.storage.store import MANIFEST

    _, result = first_run
    store = Store(local_store)
    store.write_bytes(f"checkpoints/{result.sae.fingerprint}/last.safetensors", b"left by a kill")
    store.write_bytes("sae/0123456789abcdef/sae.safetensors", b"an abandoned attempt")
    latents = result.latents.dataset.path  # named by the registered version's run
    manifest = store.read_bytes(f"{latents}/{MANIFEST}")
    store.rm(f"{latents}/{MANIFEST}")
    lock = saeflow_home() / "locks" / "stale.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    try:
        runner = CliRunner()
        gc = ["gc", local_store, "--older-than-hours", "0"]
        dry = runner.invoke(app, [*gc, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert f"would remove checkpoints/{result.sae.fingerprint}" in dry.output
        assert store.exists(f"checkpoints/{result.sae.fingerprint}") and lock.exists()
        done = runner.invoke(app, gc)
        assert done.exit_code == 0, done.output
        assert "removed sae/0123456789abcdef (unfinished attempt" in done.output
        assert not store.exists(f"checkpoints/{result.sae.fingerprint}")
        assert not store.exists("sae/0123456789abcdef") and not lock.exists()
        assert store.exists(latents) and latents not in done.output
        for ref in (result.sae, result.activations, result.tokens, result.evaluation.dataset):
            assert store.is_committed(ref.path), ref.path
    finally:
        store.write_bytes(f"{latents}/{MANIFEST}", manifest)


def test_ls_without_a_registry_still_lists_and_gc_refuses_in_one_line(
    first_run, local_store, unused_port
):
    from typer.testing import CliRunner

    from flows.cli import app

    _, result = first_run
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{unused_port}", "COLUMNS": "400"}
    listed = CliRunner().invoke(app, ["ls", local_store], env=env)
    assert listed.exit_code == 0, listed.output
    assert result.sae.path in listed.output and "versions unknown: registry" in listed.output
    gc = CliRunner().invoke(app, ["gc", local_store], env=env)
    assert gc.exit_code == 2 and gc.output.startswith("error: registry http://127.0.0.1:")
    assert "unreachable" in gc.output and len(gc.output.strip().splitlines()) == 1
