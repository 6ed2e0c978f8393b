"""Prefect task: a registered SAE's latent statistics (the viewer's data and the explainability
metric), with the explainability figures logged beside the evaluation's in its MLflow run.
Also the registry look-ups `saeflow view` uses to find the SAE a model version or run names."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from sae_core.config import LatentsConfig
from sae_core.errors import ConfigError
from sae_core.stages import latents as latents_stage
from sae_core.stages import location as location_stage
from sae_core.storage.refs import DatasetRef, committed_dataset
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS
from tasks.registry import RegistryRef
from tasks.tracking import mlflow_client, tracking_uri

LATENTS_TAG = "saeflow.latents_uri"
ARTIFACT_DIR = "latents"  # the run's artifact folder holding summary.json
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TARGET_FORMS = (
    "NAME@ALIAS, models:/NAME@ALIAS, models:/NAME/VERSION, a run id or STORE/sae/FINGERPRINT"
)


class LatentsRef(BaseModel):
    """The committed latent statistics and their explainability figures."""

    dataset: DatasetRef
    metrics: dict[str, float]


def log_explainability(run_id: str, dataset: DatasetRef, metrics: dict[str, float]) -> None:
    """The explainability figures as the run's metrics, summary.json as its `latents/`
    artifact and a tag naming the dataset; nothing when the tag already names it."""
    client = mlflow_client()
    if client.get_run(run_id).data.tags.get(LATENTS_TAG) == dataset.uri:
        return
    for key, value in metrics.items():
        if math.isfinite(value):  # NaN: nothing was scored
            client.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp, "summary.json")
        summary.write_bytes(dataset.open_store().read_bytes(f"{dataset.path}/summary.json"))
        client.log_artifact(run_id, str(summary), ARTIFACT_DIR)
    client.set_tag(run_id, LATENTS_TAG, dataset.uri)


def _locate(
    sae: DatasetRef, latents: LatentsConfig, registry: RegistryRef
) -> location_stage.Location:
    return latents_stage.locate_latent_stats(sae, latents)


@task(name="latent_stats", cache_policy=CommittedOutput(locate=_locate), **TASK_DEFAULTS)
def latent_stats(
    sae: DatasetRef, latents: LatentsConfig, registry: RegistryRef, progress: bool = True
) -> LatentsRef:
    dataset, metrics = latents_stage.compute_latent_stats(sae, latents, progress)
    log_explainability(registry.run_id, dataset, metrics)
    return LatentsRef(dataset=dataset, metrics=metrics)


def _registry(target: str) -> Any:
    """An MLflow client, unless the registry is a local database not created yet (MLflow would
    create an empty one, and the target could not be in it)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(
            f"view {target}: no model registry at {uri} yet; register a model with `saeflow "
            "run`, point SAEFLOW_HOME or MLFLOW_TRACKING_URI at a registry, or give "
            "STORE/sae/FINGERPRINT"
        )
    return mlflow_client()


def _version_run(target: str, name: str, alias: str | None, version: str | None) -> str:
    """The run that registered NAME@ALIAS, NAME/VERSION, or NAME's latest version."""
    from mlflow.exceptions import MlflowException

    client = _registry(target)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias).run_id
        if version is not None:
            return client.get_model_version(name, version).run_id
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        reason = err.message.splitlines()[0][:200]
        raise ConfigError(
            f"view {target}: {reason} (registered models: {known}); give {TARGET_FORMS}"
        ) from None
    if not found:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise ConfigError(
            f"view {target}: no registered model '{name}' (registered models: {known}); "
            f"give {TARGET_FORMS}"
        )
    return max(found, key=lambda v: int(v.version)).run_id


def _run_id(target: str) -> str:
    """The MLflow run a model or run target names."""
    rest = target.removeprefix("models:/")
    if target.startswith("runs:/"):
        return target.removeprefix("runs:/").split("/")[0]
    if _RUN_ID.match(target):
        return target
    name, at, alias = rest.partition("@")
    if at:
        return _version_run(target, name, alias, None)
    name, slash, version = rest.partition("/")
    if slash and not version.isdigit():
        raise ConfigError(
            f"view {target}: '{version}' is not a version number; give {TARGET_FORMS}"
        )
    return _version_run(target, name, None, version or None)


def sae_for(target: str) -> tuple[DatasetRef, str | None]:
    """The SAE dataset `target` names and the MLflow run that registered it (None when the
    target is a store URI). target: see TARGET_FORMS."""
    from mlflow.exceptions import MlflowException

    if "/sae/" in target and not target.startswith(("models:/", "runs:/")):
        ref = committed_dataset(target, "sae")
        if ref is None:
            raise ConfigError(f"view {target}: no committed SAE dataset there; give {TARGET_FORMS}")
        return ref, None
    run_id = _run_id(target)
    try:
        uri = _registry(target).get_run(run_id).data.tags.get("saeflow.sae_uri")
    except MlflowException as err:
        raise ConfigError(f"view {target}: {err.message.splitlines()[0][:200]}") from None
    if uri is None:
        raise ConfigError(f"view {target}: run {run_id} was not registered by saeflow (no SAE URI)")
    ref = committed_dataset(uri, "sae")
    if ref is None:
        raise ConfigError(
            f"view {target}: its SAE dataset {uri} is gone from the store; run the pipeline "
            "again to rebuild it"
        )
    return ref, run_id
