"""The flows and the `saeflow` CLI: they compose tasks (tasks/) and hold no logic of their own.

This package is the entry point of every orchestrated process: the CLI, a Prefect deployment's
entrypoint and a worker running it all import it before prefect, mlflow or great_expectations
load. So it, and nothing below it, sets the process's environment defaults (sae_core.env:
hubs offline, telemetry off, Prefect's home in saeflow's state directory).
"""

from sae_core.env import apply_runtime_env

apply_runtime_env()
