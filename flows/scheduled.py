"""Entry points for the scheduled deployments (deployments/prefect.yaml): a preset (name or
YAML path), `key.path=value` overrides and a store in, the pipeline, sweep or frontier flow out.
Deployment parameters stay short strings instead of a whole configuration."""

from __future__ import annotations

from prefect import flow

from flows.frontier import FrontierResult, frontier
from flows.pipeline import PipelineResult, pipeline
from flows.sweep import SweepResult, sweep
from sae_core.config import load_config


@flow(name="saeflow-pipeline-preset", log_prints=True)
def pipeline_from_preset(
    preset: str = "demo", overrides: list[str] | None = None, store: str | None = None
) -> PipelineResult:
    return pipeline(load_config(preset, overrides or [], store), progress=False)


@flow(name="saeflow-sweep-preset", log_prints=True)
def sweep_from_preset(
    preset: str = "demo", overrides: list[str] | None = None, store: str | None = None
) -> SweepResult:
    return sweep(load_config(preset, overrides or [], store), progress=False)


@flow(name="saeflow-frontier-preset", log_prints=True)
def frontier_from_preset(
    preset: str = "demo", overrides: list[str] | None = None, store: str | None = None
) -> FrontierResult:
    return frontier(load_config(preset, overrides or [], store), progress=False)
