"""Process environment saeflow runs under: offline, telemetry off, state under one home.

Nothing here runs at import. The entry points (the `flows` package, which the CLI and Prefect's
deployments load first, and the tests' conftest) call `apply_runtime_env` before prefect, mlflow
or great_expectations import; sae_core's own code calls `hub_offline` before it loads
transformers or datasets, so that a library user's process never reaches for a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

# Read by huggingface_hub, transformers and datasets when they import.
HUB_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Read by the orchestration stack (Prefect, MLflow, Great Expectations).
SERVICE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    # The ephemeral Prefect server migrates a fresh database on first start; on 2 busy cores
    # that outlasts Prefect's 20 s default and a newcomer's first run would fail.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Prefect's SQLite (WAL already) waits this long for a lock before "database is locked";
    # its 10 s default was outlasted under load (concurrent runs beside training on 2 cores).
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
}


def saeflow_home() -> Path:
    """State directory: `.saeflow/` in the working directory unless SAEFLOW_HOME is set."""
    return Path(os.environ.get("SAEFLOW_HOME", ".saeflow")).resolve()


def asset_cache() -> Path:
    """Where converted demo assets (models, corpora) live; shared by every checkout."""
    default = Path.home() / ".cache" / "saeflow"
    return Path(os.environ.get("SAEFLOW_CACHE", default)).resolve()


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hub_offline() -> None:
    """Model and dataset hubs off (set-if-unset): call before transformers or datasets import."""
    for key, value in HUB_DEFAULTS.items():
        os.environ.setdefault(key, value)


def apply_runtime_env() -> None:
    """Everything an orchestrated process needs set before prefect or mlflow import: hubs off,
    telemetry off, and Prefect's home (created) in saeflow's state directory."""
    hub_offline()
    for key, value in SERVICE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(saeflow_home() / "prefect"))
    # Prefect creates only the last level of its home.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
