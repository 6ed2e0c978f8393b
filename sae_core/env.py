"""Process environment saeflow runs under: offline, telemetry off, state under one home."""

from __future__ import annotations

import os
from pathlib import Path

# Set before transformers, datasets, prefect or mlflow import, wherever saeflow runs.
RUNTIME_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
    # The ephemeral Prefect server migrates a fresh database on first start; on 2 busy cores
    # that outlasts Prefect's 20 s default and a newcomer's first run would fail.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
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


def apply_runtime_env() -> None:
    for key, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Prefect keeps its database and cached results in saeflow's state directory.
    os.environ.setdefault("PREFECT_HOME", str(saeflow_home() / "prefect"))


def ensure_prefect_home() -> None:
    """Create PREFECT_HOME's parents: Prefect creates only the last level. Called by flows/."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
