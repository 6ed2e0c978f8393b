"""deployments/prefect.yaml: every deployment loads and validates; end to end (slow), `make
deploy`'s script registers them with a real `prefect server` and a worker runs a scheduled run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from deployments.deploy import CONCURRENCY_ENV, PREFECT_FILE, REPO, pool_concurrency, work_pools
from tests.helpers.services import free_port

SPEC = yaml.safe_load(PREFECT_FILE.read_text())


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_entrypoint_parameters_and_schedules_are_valid(deployment):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    file, _, func = deployment["entrypoint"].partition(":")
    assert (REPO / file).is_file()
    flow = load_flow_from_entrypoint(f"{REPO / file}:{func}")
    flow.validate_parameters(deployment.get("parameters", {}))
    assert deployment["schedules"], "every deployment runs on a schedule"
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert deployment["work_pool"]["name"] in work_pools() == ["saeflow"]


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api} did not start in {timeout} s")


def test_the_work_pool_runs_one_flow_run_at_a_time_unless_told(monkeypatch):
    monkeypatch.delenv(CONCURRENCY_ENV, raising=False)
    assert pool_concurrency() == 1
    monkeypatch.setenv(CONCURRENCY_ENV, "3")
    assert pool_concurrency() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(CONCURRENCY_ENV, bad)
        with pytest.raises(SystemExit, match=f"{CONCURRENCY_ENV}='{bad}'"):
            pool_concurrency()


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on loopback, its own home and database; its scheduler
    service polls every second so cron schedules materialise as flow runs quickly."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "prefect-server.log"
    command = [Path(sys.executable).with_name("prefect"), "server", "start"]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(api, server, log)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_make_deploy_then_a_worker_runs_a_scheduled_run(
    prefect_server, tiny_llama_dir, tiny_corpus_dir, tmp_path
):
    started = time.monotonic()
    env = {**prefect_server, "SAEFLOW_HOME": str(tmp_path / "home")}
    deploy = subprocess.run(
        [sys.executable, "-m", "deployments.deploy"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    # The tiny pipeline as a preset file, so the nightly deployment runs in seconds.
    preset = tmp_path / "tiny-test.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "name": "deployed",
                "store": str(tmp_path / "store"),
                "model": {"path": str(tiny_llama_dir), "hook": "resid_post.2"},
                "data": {
                    "corpus": str(tiny_corpus_dir),
                    "context_len": 32,
                    "train_tokens": 4096,
                    "eval_tokens": 512,
                    "shard_rows": 1500,
                },
                "sae": {"n_latents": 256, "k": 8, "dead_window_tokens": 2048},
                "train": {"batch_size": 256, "checkpoint_every_tokens": 2048},
                "registry": {"model_name": "deployed-sae"},
            }
        )
    )
    script = f"""
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def main():
    async with get_client() as client:
        deployments = await client.read_deployments()
        found = {{d.name: [s.schedule.cron for s in d.schedules] for d in deployments}}
        limit = (await client.read_work_pool("saeflow")).concurrency_limit
    run = await run_deployment(
        "saeflow-pipeline-preset/nightly", parameters={{"preset": {str(preset)!r}}}, timeout=0
    )
    print(json.dumps({{"deployments": found, "run": str(run.id), "limit": limit}}))

asyncio.run(main())
"""
    created = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert created.returncode == 0, created.stderr[-3000:]
    facts = yaml.safe_load(created.stdout.strip().splitlines()[-1])
    assert facts["deployments"] == {
        d["name"]: [s["cron"] for s in d["schedules"]] for d in SPEC["deployments"]
    }
    assert facts["limit"] == 1  # a scheduled run waits for a running one

    worker = subprocess.run(
        [
            Path(sys.executable).with_name("prefect"),
            "worker",
            "start",
            "--pool",
            "saeflow",
            "--run-once",
            "--limit",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    check = f"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
with get_client(sync_client=True) as client:
    run = client.read_flow_run({facts["run"]!r})
    deployment = client.read_deployment_by_name("saeflow-pipeline-preset/nightly")
    mine = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    runs = client.read_flow_runs(deployment_filter=mine, limit=20)
    scheduled = [str(r.expected_start_time) for r in runs if r.state.is_scheduled()]
print(json.dumps({{"state": run.state.name, "scheduled": scheduled}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "Completed", worker.stdout[-3000:]
    # The worker's log shows the run's progress, stage by stage.
    for stage in ("sample_tokens", "train_sae", "register_model"):
        assert f"stage {stage}: started" in worker.stdout + worker.stderr, stage
    assert "stage train_sae: computed in" in worker.stdout + worker.stderr
    # The cron schedule has materialised future nightly runs at 02:00 UTC.
    assert outcome["scheduled"] and all("02:00:00" in t for t in outcome["scheduled"])
    assert (tmp_path / "store" / "sae").is_dir()
    print(f"deploy + worker run: {time.monotonic() - started:.0f} s")
