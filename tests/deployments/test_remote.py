"""Remote mode (slow): SeaweedFS, an MLflow tracking server with artifacts on it and a Prefect
server, all on loopback as `saeflow services up` starts them; `saeflow run` with their
environment keeps its data, its registry and its flow runs on them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.services import free_port


@pytest.mark.slow
@pytest.mark.s3
def test_services_up_then_run_uses_the_servers(tmp_path, tiny_llama_dir, tiny_corpus_dir):
    from deployments.seaweedfs import SeaweedFS
    from deployments.servers import MlflowServer, PrefectServer

    home = tmp_path / "services"
    s3 = SeaweedFS(home, s3_port=free_port(), port_base=random.randrange(20000, 40000, 100))
    services = [s3, MlflowServer(home, port=free_port(), s3=s3), PrefectServer(home, free_port())]
    try:
        try:
            s3.up()
        except FileNotFoundError as err:
            pytest.skip(str(err))
        for service in services[1:]:
            assert service.up(timeout=180).serving
        env = {**os.environ, "SAEFLOW_HOME": str(tmp_path / "home")}
        for service in services:
            env |= service.env(reveal=True)
        preset = tmp_path / "remote.yaml"
        preset.write_text(
            yaml.safe_dump(
                {
                    "name": "remote",
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
                    "registry": {"model_name": "remote-sae"},
                }
            )
        )
        saeflow = Path(sys.executable).with_name("saeflow")
        run = subprocess.run(
            [saeflow, "run", "--preset", str(preset), "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        check = """
import json, mlflow, s3fs
from prefect.client.orchestration import get_client
client = mlflow.MlflowClient()
version = client.get_model_version_by_alias("remote-sae", "challenger")
fs = s3fs.S3FileSystem()
artifacts = [p for p in fs.find("saeflow/mlartifacts") if p.endswith("sae.safetensors")]
store = fs.ls("saeflow/store")
with get_client(sync_client=True) as prefect:
    flows = sorted({prefect.read_flow(r.flow_id).name for r in prefect.read_flow_runs()})
print(json.dumps({"source": version.source, "artifacts": artifacts, "store": store, "flows": flows}))
"""
        found = subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
        )
        assert found.returncode == 0, found.stderr[-3000:]
        facts = yaml.safe_load(found.stdout.strip().splitlines()[-1])
        assert facts["artifacts"], facts  # the registered model's weights are on the S3 store
        assert any(p.endswith("/sae") for p in facts["store"]), facts["store"]
        assert "saeflow-pipeline" in facts["flows"]
        assert not (tmp_path / "home" / "mlflow.db").exists()  # no embedded registry was used
    finally:
        for service in reversed(services):
            service.down()
