"""Prefect task: record a trained, evaluated SAE in MLflow and register a model version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from sae_core.config import PipelineConfig, RegistryConfig
from sae_core.env import saeflow_home
from sae_core.fingerprint import fingerprint
from sae_core.refs import DatasetRef
from sae_core.stages import Location
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS
from tasks.evaluate import EvalRef

FINGERPRINT_TAG = "saeflow.fingerprint"
# The files of an SAE dataset that make up the registered artifact.
SAE_ARTIFACTS = ("sae.safetensors", "config.json", "history.json")


class RegistryRef(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str
    tracking_uri: str


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite database in the state directory."""
    default = f"sqlite:///{saeflow_home() / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI", default)


def _experiment_id(name: str) -> str:
    """The experiment's id, creating it with artifacts in the state directory when tracking locally."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = "MLFLOW_TRACKING_URI" not in os.environ
    artifacts = (saeflow_home() / "mlartifacts").as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=artifacts)


def _client() -> Any:
    import mlflow

    saeflow_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def locate_registration(
    sae: DatasetRef, evaluation: EvalRef, config: PipelineConfig, registry: RegistryConfig
) -> Location:
    fp = fingerprint("register", sae.fingerprint, evaluation.dataset.fingerprint, registry)
    return Location(store=sae.store, path=sae.path, fingerprint=fp)


def find_version(name: str, fp: str) -> Any | None:
    """The registered version carrying this registration fingerprint, if any."""
    client = _client()
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fp}'"
        )
    except Exception:  # noqa: BLE001 - a registry without this model has no such version
        return None
    return found[0] if found else None


def _is_registered(loc: Location, args: dict[str, Any]) -> bool:
    return find_version(args["registry"].model_name, loc.fingerprint) is not None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@task(
    name="register_model",
    cache_policy=CommittedOutput(locate=locate_registration, is_done=_is_registered),
    **TASK_DEFAULTS,
)
def register_model(
    sae: DatasetRef, evaluation: EvalRef, config: PipelineConfig, registry: RegistryConfig
) -> RegistryRef:
    import mlflow

    loc = locate_registration(sae, evaluation, config, registry)
    client = _client()
    existing = find_version(registry.model_name, loc.fingerprint)
    if existing is None:
        existing = _log_and_register(client, sae, evaluation, config, registry, loc.fingerprint)
    client.set_registered_model_alias(registry.model_name, registry.alias, existing.version)
    return RegistryRef(
        name=registry.model_name,
        version=str(existing.version),
        alias=registry.alias,
        run_id=existing.run_id,
        tracking_uri=mlflow.get_tracking_uri(),
    )


def _log_and_register(
    client: Any,
    sae: DatasetRef,
    evaluation: EvalRef,
    config: PipelineConfig,
    registry: RegistryConfig,
    fp: str,
) -> Any:
    import mlflow
    from mlflow.entities import Metric

    store = sae.open_store()
    history = store.read_json(f"{sae.path}/history.json")
    run_name = f"{config.name}-{sae.fingerprint[:8]}"
    with mlflow.start_run(
        experiment_id=_experiment_id(registry.experiment), run_name=run_name
    ) as run:
        mlflow.log_params(_flatten(config.model_dump(mode="json")))
        mlflow.log_metrics(evaluation.metrics)
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        mlflow.set_tags(
            {
                "saeflow.sae_uri": sae.uri,
                "saeflow.sae_fingerprint": sae.fingerprint,
                "saeflow.eval_uri": evaluation.dataset.uri,
            }
        )
        curve = [
            Metric(key=f"train/{key}", value=float(value), timestamp=0, step=int(row["tokens"]))
            for row in history
            for key, value in row.items()
            if key != "tokens" and isinstance(value, int | float)
        ]
        for start in range(0, len(curve), 1000):
            client.log_batch(run.info.run_id, metrics=curve[start : start + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            for name in SAE_ARTIFACTS:
                Path(tmp, name).write_bytes(store.read_bytes(f"{sae.path}/{name}"))
            mlflow.log_artifacts(tmp, "sae")
        source = f"{run.info.artifact_uri}/sae"
    try:
        client.get_registered_model(registry.model_name)
    except Exception:  # noqa: BLE001 - first version of this model
        client.create_registered_model(registry.model_name)
    return client.create_model_version(
        registry.model_name, source=source, run_id=run.info.run_id, tags={FINGERPRINT_TAG: fp}
    )
