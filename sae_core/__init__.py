"""saeflow's science and data plane: importable and testable without any orchestrator."""

from sae_core.env import apply_runtime_env

apply_runtime_env()
