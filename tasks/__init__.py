"""Thin Prefect tasks around sae_core: they take and return small references."""

from sae_core.env import ensure_prefect_home

ensure_prefect_home()
