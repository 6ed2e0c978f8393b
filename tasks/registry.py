"""Prefect task: record a trained, evaluated SAE in MLflow and register a model version.

The run holds params, evaluation metrics, training curves, the config, the data lineage (the
activations and token datasets as MLflow dataset inputs: store URI + fingerprint) and the git
revision. The model version is a pickle-free pyfunc (models-from-code, tasks/pyfunc_model.py)
that loads the safetensors weights. `MlflowRegistry` gives the promotion gate its registry.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

import sae_core
from sae_core.config import PipelineConfig, RegistryConfig
from sae_core.errors import ConfigError
from sae_core.sae import WEIGHTS_FILE
from sae_core.sae.formats import ORIGIN_FILE, Origin
from sae_core.stages.location import Location
from sae_core.storage.fingerprint import fingerprint
from sae_core.storage.lineage import sae_lineage
from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS
from tasks.evaluate import EvalRef
from tasks.model_code import PACKAGE, copy_inference_code
from tasks.saebench import SaeBenchRef
from tasks.tracking import experiment_id, mlflow_client, tracking_uri

FINGERPRINT_TAG = "saeflow.fingerprint"
# Small files of an SAE dataset kept with the run (the weights travel in the model).
RUN_ARTIFACTS = ("config.json", "history.json")
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME_IN_RUN = "sae"


class RegistryRef(BaseModel):
    """The registered version of a run's SAE. Which aliases point at it is not part of it:
    a cached reference would go stale when another run moves them (tasks/promote.py moves
    them, outside any cache)."""

    name: str
    version: str
    run_id: str
    tracking_uri: str


def locate_registration(
    sae: DatasetRef,
    evaluation: EvalRef,
    config: PipelineConfig,
    registry: RegistryConfig,
    saebench: SaeBenchRef | None = None,
) -> Location:
    # The store is part of the key: the registered run points at this store's copy of the SAE,
    # and the same SAE trained on another store is another registration.
    evaluated = [evaluation.dataset.fingerprint]
    if saebench is not None:  # without it, the key registrations made before the stage had
        evaluated.append(saebench.dataset.fingerprint)
    fp = fingerprint("register", sae.store, sae.fingerprint, *evaluated, registry)
    return Location(store=sae.store, path=sae.path, fingerprint=fp)


def _versions_with(name: str, fp: str) -> list[Any]:
    client = mlflow_client()
    try:
        return client.search_model_versions(
            f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fp}'"
        )
    except Exception:  # noqa: BLE001 - a registry without this model has no such version
        return []


def find_version(name: str, fp: str) -> Any | None:
    """The registered version carrying this registration fingerprint, if any."""
    found = _versions_with(name, fp)
    return found[0] if found else None


def _is_registered(loc: Location, args: dict[str, Any]) -> bool:
    return find_version(args["registry"].model_name, loc.fingerprint) is not None


def _unregister(
    sae: DatasetRef,
    evaluation: EvalRef,
    config: PipelineConfig,
    registry: RegistryConfig,
    saebench: SaeBenchRef | None = None,
) -> None:
    """Untag the version registered for these inputs: the next registration logs a new run
    and version (the old version stays, as history)."""
    fp = locate_registration(sae, evaluation, config, registry, saebench).fingerprint
    for version in _versions_with(registry.model_name, fp):
        mlflow_client().delete_model_version_tag(
            registry.model_name, version.version, FINGERPRINT_TAG
        )


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
    cache_policy=CommittedOutput(
        locate=locate_registration,
        is_done=_is_registered,
        forget=_unregister,
        reused="reused from the registry",
    ),
    **TASK_DEFAULTS,
)
def register_model(
    sae: DatasetRef,
    evaluation: EvalRef,
    config: PipelineConfig,
    registry: RegistryConfig,
    saebench: SaeBenchRef | None = None,
) -> RegistryRef:
    """saebench: SAEBench's figures, logged beside the evaluation's (the promotion gate reads
    both from the run)."""
    import mlflow

    loc = locate_registration(sae, evaluation, config, registry, saebench)
    client = mlflow_client()
    existing = find_version(registry.model_name, loc.fingerprint)
    if existing is None:
        metrics = evaluation.metrics | (saebench.metrics if saebench else {})
        existing = _log_and_register(
            client, sae, evaluation, metrics, config, registry, loc.fingerprint
        )
    return RegistryRef(
        name=registry.model_name,
        version=str(existing.version),
        run_id=existing.run_id,
        tracking_uri=mlflow.get_tracking_uri(),
    )


def _log_and_register(
    client: Any,
    sae: DatasetRef,
    evaluation: EvalRef,
    metrics: dict[str, float],
    config: PipelineConfig,
    registry: RegistryConfig,
    fp: str,
) -> Any:
    import mlflow
    from mlflow.entities import Metric

    store = sae.open_store()
    history = store.read_json(f"{sae.path}/history.json")
    lineage = sae_lineage(sae)
    run_name = f"{config.name}-{sae.fingerprint[:8]}"
    with mlflow.start_run(
        experiment_id=experiment_id(registry.experiment), run_name=run_name
    ) as run:
        mlflow.log_params(_flatten(config.model_dump(mode="json")))
        mlflow.log_params(_resolved_params(sae, lineage.activations))
        mlflow.log_metrics(metrics)
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        mlflow.set_tags(
            {
                "saeflow.sae_uri": sae.uri,
                "saeflow.sae_fingerprint": sae.fingerprint,
                "saeflow.eval_uri": evaluation.dataset.uri,
                "saeflow.data_fingerprint": lineage.activations.fingerprint,
                **_git_tags(),
            }
        )
        mlflow.log_input(_dataset_input("activations", lineage.activations), context="training")
        mlflow.log_input(_dataset_input("tokens", lineage.tokens), context="evaluation")
        curve = [
            Metric(key=f"train/{key}", value=float(value), timestamp=0, step=int(row["tokens"]))
            for row in history
            for key, value in row.items()
            if key != "tokens" and isinstance(value, int | float)
        ]
        for start in range(0, len(curve), 1000):
            client.log_batch(run.info.run_id, metrics=curve[start : start + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            for name in (*RUN_ARTIFACTS, WEIGHTS_FILE):
                Path(tmp, name).write_bytes(store.read_bytes(f"{sae.path}/{name}"))
            for name in RUN_ARTIFACTS:
                mlflow.log_artifact(str(Path(tmp, name)), "sae")
            origin = Origin.of(lineage)
            Path(tmp, ORIGIN_FILE).write_text(origin.model_dump_json())
            model = _log_pyfunc(Path(tmp), sae.manifest(SaeManifest))
    version = mlflow.register_model(
        model.model_uri, registry.model_name, tags={FINGERPRINT_TAG: fp}
    )
    _link_run(run.info.run_id, registry.model_name, str(version.version))
    return version


def _resolved_params(sae: DatasetRef, activations: DatasetRef) -> dict[str, str]:
    """What `auto` and the dtypes became: the devices and dtypes the stages recorded in their
    manifests (`*_resolved` beside the configured `model.device`, `train.device`, ...). Datasets
    made before they were recorded give none."""
    trained = sae.manifest(SaeManifest)
    extracted = activations.manifest(ActivationsManifest)
    resolved = {
        "train.device_resolved": trained.device,
        "train.dtype_resolved": trained.gemm_dtype,
        "model.device_resolved": ",".join(extracted.model_devices or []) or None,
        "model.dtype_resolved": extracted.model_dtype,
        "data.storage_dtype_resolved": extracted.dtype,
        "sae.matryoshka_prefixes_resolved": trained.matryoshka_prefixes,
    }
    return {key: value for key, value in resolved.items() if value is not None}


def _dataset_input(kind: str, ref: DatasetRef) -> Any:
    """An MLflow dataset naming a store dataset without copying it: its URI and fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = ref.uri if "://" in ref.uri else Path(ref.uri).as_uri()
    with warnings.catch_warnings():
        # MLflow registers its local source for two schemes and warns that it had to choose.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source, name=f"{kind}-{ref.fingerprint}", digest=ref.fingerprint)


def _git_tags() -> dict[str, str]:
    """The code's git revision (MLflow's own tag name) and whether the tree had local edits."""
    repo = Path(sae_core.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return {}
    return {"mlflow.source.git.commit": commit, "saeflow.git_dirty": str(dirty).lower()}


def _log_pyfunc(folder: Path, manifest: SaeManifest) -> Any:
    """Log the SAE as a pickle-free pyfunc model: the code file, the safetensors weights, the
    sae_core modules inference imports (so loading needs no saeflow install: tasks/model_code.py)
    and a tensor signature."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    d, n = manifest.d, manifest.n
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n))]),
    )
    code = folder / "code"
    copy_inference_code(code)
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(PYFUNC_FILE),
        # "sae" is the key pyfunc_model.py loads; origin.json is for `saeflow export`.
        artifacts={"sae": str(folder / WEIGHTS_FILE), "origin": str(folder / ORIGIN_FILE)},
        code_paths=[str(code / PACKAGE)],
        signature=signature,
        input_example=np.zeros((1, d), dtype=np.float32),
        # Stated rather than inferred: inference would import and probe the model. A conda
        # environment of our own: MLflow's default asks pip for its version (absent from a uv
        # venv) and warns.
        conda_env={
            "name": "saeflow-sae",
            "channels": ["conda-forge"],
            "dependencies": [
                f"python={sys.version_info.major}.{sys.version_info.minor}",
                "pip",
                {
                    "pip": [
                        f"torch=={torch.__version__.split('+')[0]}",
                        "safetensors",
                        "pydantic>=2",
                        "pyyaml",
                        "numpy",
                        "pyarrow",
                        f"mlflow=={mlflow.__version__}",
                    ]
                },
            ],
        },
    )


def _link_run(run_id: str, model: str, version: str) -> None:
    """A Prefect artifact pointing at the MLflow run and the version it registered."""
    create_markdown_artifact(
        key="mlflow-run",
        description="Where this run's SAE is recorded",
        markdown=(
            f"MLflow run `{run_id}` ({tracking_uri()}), registered as "
            f"`{model}` version {version}: `models:/{model}/{version}`"
        ),
    )


class MlflowRegistry:
    """The promotion gate's registry (sae_core.evaluation.promotion.Registry) on MLflow's model registry;
    a version's metrics are those its run logged."""

    def __init__(self) -> None:
        self.client = mlflow_client()

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a model, as the registry holds them now ({} for no such model)."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such model yet
                return {}
            raise
        return {alias: str(version) for alias, version in aliases.items()}

    def version_for_alias(self, name: str, alias: str) -> str | None:
        return self.aliases(name).get(alias)

    def metrics(self, name: str, version: str) -> dict[str, float]:
        run_id = self.client.get_model_version(name, version).run_id
        return dict(self.client.get_run(run_id).data.metrics)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)


def registered_sae(model_uri: str) -> tuple[Any, Origin]:
    """The SAE (any kind) and origin of a registered version (`models:/NAME@ALIAS`, `models:/NAME/N`),
    read from its artifacts: the safetensors weights and origin.json."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from sae_core.sae import load_sae_bytes

    mlflow_client()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        except MlflowException as err:
            raise ConfigError(f"{model_uri}: {err.message.splitlines()[0]}") from None
        weights = next(folder.rglob(WEIGHTS_FILE), None)
        if weights is None:
            raise ConfigError(
                f"{model_uri}: no {WEIGHTS_FILE} in the model; was it registered by saeflow?"
            )
        origin_file = next(folder.rglob(ORIGIN_FILE), None)
        origin = Origin.model_validate_json(origin_file.read_text()) if origin_file else Origin()
        return load_sae_bytes(weights.read_bytes()), origin
