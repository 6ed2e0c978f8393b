"""Operating saeflow on the tiny pipeline, through Prefect and the real MLflow registry:
a failed training stage re-run both ways (a new run, and `prefect flow-run retry`), the run's
lineage and provenance, the promote flow and CLI, and the registered pyfunc model loaded in a
fresh process that has only the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_core.storage import faults
from sae_core.storage.store import Store
from tests.helpers.pipeline import tiny_config

MODEL = "tiny-ops"
REPO = Path(__file__).resolve().parents[2]
FAULT = "checkpoints/@1"  # the first checkpoint (2048 tokens) lands, every later write fails
CHECKPOINT_TOKENS = 2048


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ops-store"))


def ops_config(tiny_llama_dir, tiny_corpus_dir, store, k: int):
    return tiny_config(
        tiny_llama_dir, tiny_corpus_dir, store, sae={"k": k}, registry={"model_name": MODEL}
    )


def failing_run(config):
    """Run the pipeline with every checkpoint write after the first failing: training fails
    for good after its retries (which run without waiting here)."""
    from flows.pipeline import pipeline
    from tasks.train import train_sae

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faults.ENV, FAULT)
        mp.setattr(train_sae, "retry_delay_seconds", [0.0] * train_sae.retries)
        faults.reset()
        state = pipeline(config, progress=False, return_state=True)
    assert state.is_failed(), state
    return state


def task_runs(flow_run_id) -> dict[str, list]:
    """The task runs of a flow run by task name, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    by_name: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.created):
        by_name.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return by_name


def sae_manifest(path: str, store: str) -> dict:
    return Store(store).manifest(path)


@pytest.fixture(scope="module")
def first(prefect, tiny_llama_dir, tiny_corpus_dir, store):
    """A run whose training fails (injected storage fault), then a new run once it is fixed."""
    from flows.pipeline import pipeline

    config = ops_config(tiny_llama_dir, tiny_corpus_dir, store, k=8)
    failed = failing_run(config)
    recovered = pipeline(config, progress=False)
    return config, failed, recovered


@pytest.fixture(scope="module")
def champion(first):
    """The first promotion: no champion yet, so the first model becomes champion."""
    from flows.promote import promote
    from sae_core.evaluation.promotion import PromotionPolicy

    return promote(MODEL, PromotionPolicy())


@pytest.fixture(scope="module")
def challenger(champion, tiny_llama_dir, tiny_corpus_dir, store):
    """A second version, k=4, registered as challenger after the first became champion."""
    from flows.pipeline import pipeline

    return pipeline(ops_config(tiny_llama_dir, tiny_corpus_dir, store, k=4), progress=False)


def test_failed_stage_is_retried_then_fails_after_the_stages_before_it(first):
    _, failed, _ = first
    runs = task_runs(failed.state_details.flow_run_id)
    train = runs["train_sae"][-1]
    assert train.state.is_failed() and "injected fault" in train.state.message
    assert train.run_count == 4  # an OSError: retried three times before giving up
    assert runs["validate"][-1].state.is_completed()  # the stages before it finished


def test_new_run_skips_completed_stages_and_resumes_training(first, store):
    _, _, recovered = first
    expected = {
        "sample_tokens": "cached",
        "extract_activations": "cached",
        "validate": "cached",
        "train_sae": f"resumed from {CHECKPOINT_TOKENS} tokens",
        "evaluate_sae": "computed",
        "saebench_sae": "computed",
        "register_model": "computed",
    }
    assert {stage: recovered.stages[stage] for stage in expected} == expected
    assert sae_manifest(recovered.sae.path, store)["resumed_from_tokens"] == CHECKPOINT_TOKENS


def test_run_records_lineage_and_provenance(first):
    import mlflow

    _, _, recovered = first
    client = mlflow.MlflowClient(recovered.registry.tracking_uri)
    run = client.get_run(recovered.registry.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    acts = inputs["training"]
    assert acts.digest == recovered.activations.fingerprint
    assert recovered.activations.path in acts.source
    assert inputs["evaluation"].digest == recovered.tokens.fingerprint
    assert run.data.tags["saeflow.data_fingerprint"] == recovered.activations.fingerprint
    assert any(k.startswith("train/") for k in run.data.metrics)
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if revision.returncode == 0:
        assert run.data.tags["mlflow.source.git.commit"] == revision.stdout.strip()


def test_right_after_a_run_only_challenger_exists_as_the_readme_says(first, tmp_path):
    """README's export example (defect 8): after a run, before any promotion, `@challenger`
    exports and `@champion` is a one-line error."""
    from flows.cli import app

    runner = CliRunner()
    exported = runner.invoke(
        app,
        ["export", f"models:/{MODEL}@challenger", "--format", "saelens", "--out", str(tmp_path)],
    )
    assert exported.exit_code == 0, exported.output
    out = str(tmp_path / "champion")
    missing = runner.invoke(
        app, ["export", f"models:/{MODEL}@champion", "--format", "saelens", "--out", out]
    )
    assert missing.exit_code == 2 and missing.output.startswith("error:"), missing.output
    assert "champion" in missing.output


def test_first_promotion_crowns_the_first_model(first, champion):
    import mlflow

    _, _, recovered = first
    assert champion.decision.promote and champion.champion_before is None
    client = mlflow.MlflowClient(recovered.registry.tracking_uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == recovered.registry.version
    assert version.tags["saeflow.promotion.decision"] == "promoted"


def test_promote_cli_dry_run_then_gate_rejects_an_incomparable_challenger(champion, challenger):
    import mlflow

    from flows.cli import app
    from flows.cli.models import EXIT_REJECTED

    runner = CliRunner()
    dry = runner.invoke(app, ["promote", MODEL, "--dry-run"])
    assert dry.exit_code == EXIT_REJECTED == 3, dry.output
    assert "kept champion" in dry.output and "dry run" in dry.output and "FAIL" in dry.output
    client = mlflow.MlflowClient()
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert "saeflow.promotion.decision" not in challenger.tags  # the dry run wrote nothing

    real = runner.invoke(app, ["promote", MODEL])
    assert real.exit_code == EXIT_REJECTED, real.output
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert challenger.tags["saeflow.promotion.decision"] == "rejected"
    assert "l0" in challenger.tags["saeflow.promotion.reason"]  # k=4 against k=8
    assert "FAIL" in challenger.tags["saeflow.promotion.l0"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == champion.challenger


def test_promote_cli_names_bad_input_in_one_line():
    from flows.cli import app

    result = CliRunner().invoke(app, ["promote", MODEL, "--primary", "accuracy"])
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert "unknown metric 'accuracy'" in result.output and "Traceback" not in result.output


def test_champion_pyfunc_predicts_latents_in_a_fresh_process(first, champion, store, tmp_path):
    import mlflow

    from sae_core.sae import load_sae

    _, _, recovered = first
    uri = f"models:/{MODEL}@champion"
    files = [
        p.name for p in Path(mlflow.artifacts.download_artifacts(uri)).rglob("*") if p.is_file()
    ]
    assert {"sae.safetensors", "MLmodel"} <= set(files)
    assert not any(f.endswith((".pkl", ".pickle")) or "cloudpickle" in f for f in files), files
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.inputs[0].shape == (-1, 64)

    sae = load_sae(recovered.sae)
    acts = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.05).numpy()
    codes = sae.encode(torch.from_numpy(acts))
    expected = torch.zeros(16, sae.n_latents).scatter_(1, codes.idx, codes.vals).numpy()
    np.save(tmp_path / "acts.npy", acts)

    script = (
        "import sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "np.save('latents.npy', model.predict(np.load('acts.npy')))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SAEFLOW", "PREFECT"))},
        "MLFLOW_TRACKING_URI": recovered.registry.tracking_uri,
    }
    hidden = Path(store).with_name(Path(store).name + "-hidden")
    Path(store).rename(hidden)  # the fresh process gets the registry, not the store
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, uri],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hidden.rename(store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (16, sae.n_latents) and latents.dtype == np.float32
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-6)
    assert ((latents > 0).sum(axis=1) <= sae.k).all()


def test_export_of_the_champion_carries_its_origin(champion, tmp_path):
    import json

    from flows.cli import app

    out = tmp_path / "layers.2"
    result = CliRunner().invoke(
        app, ["export", f"models:/{MODEL}@champion", "--format", "sparsify", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["saeflow"]["origin"]["hook"] == "resid_post.2" and cfg["k"] == 8
    assert cfg["saeflow"]["origin"]["skip_first_position"] is True
    assert "note: sparsify has no input normalisation" in result.output
    # The tiny model is a local folder with no hub id: nothing names its path as the model.
    assert cfg["saeflow"]["origin"]["model"] is None and "--model HUB_ID" in result.output


@pytest.fixture(scope="module")
def retried(prefect, tiny_llama_dir, tiny_corpus_dir, store, first):
    """A failing run with another SAE, then `prefect flow-run retry` of that same flow run (in
    a subprocess, as a user would: ~40 s, hence slow). Registers the last challenger."""
    from prefect.settings import PREFECT_API_URL

    config = ops_config(tiny_llama_dir, tiny_corpus_dir, store, k=16)
    failed = failing_run(config)
    flow_run_id = failed.state_details.flow_run_id
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}  # the cause is fixed
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    proc = subprocess.run(
        [
            Path(sys.executable).with_name("prefect"),
            "flow-run",
            "retry",
            str(flow_run_id),
            "--entrypoint",
            "flows/pipeline.py:pipeline",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config, flow_run_id


@pytest.mark.slow
def test_flow_run_retry_skips_completed_stages_and_resumes_training(first, retried, store):
    from sae_core.stages.train import locate_sae

    _, _, recovered = first
    config, flow_run_id = retried
    latest = {name: runs[-1].state.name for name, runs in task_runs(flow_run_id).items()}
    for stage in ("sample_tokens", "extract_activations", "validate"):
        assert latest[stage] == "Cached", latest
    assert latest["train_sae"] == latest["register_model"] == "Completed", latest
    sae = locate_sae(recovered.activations, config.sae, config.train)
    assert sae_manifest(sae.path, store)["resumed_from_tokens"] == CHECKPOINT_TOKENS


def test_export_of_a_store_dataset_names_its_hook_for_saelens(first, tmp_path):
    import json

    from flows.cli import app

    _, _, recovered = first
    out = tmp_path / "saelens"
    result = CliRunner().invoke(
        app, ["export", recovered.sae.uri, "--format", "saelens", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["context_size"] == 32
