"""Prefect flows and the CLI: they compose tasks and nothing else."""

from sae_core.env import ensure_prefect_home

ensure_prefect_home()
