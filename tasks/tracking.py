"""Where MLflow records: the tracking URI (a server, or SQLite in saeflow's state directory),
a client for it, and experiments created with their artifacts beside a local database."""

from __future__ import annotations

import os
from typing import Any

from sae_core.env import saeflow_home


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite database in the state directory."""
    default = f"sqlite:///{saeflow_home() / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI", default)


def experiment_id(name: str) -> str:
    """The experiment's id, creating it with artifacts in the state directory when tracking locally."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A tracking server decides its own artifact root; a local database keeps them beside it.
    local = tracking_uri().startswith(("sqlite:", "file:"))
    artifacts = (saeflow_home() / "mlartifacts").as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=artifacts)


def mlflow_client() -> Any:
    import mlflow

    saeflow_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()
