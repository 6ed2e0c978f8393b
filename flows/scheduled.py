"""Entry points for the scheduled deployments (deployments/prefect.yaml): a preset (name or
YAML path), `key.path=value` overrides, a store and a task runner (`local` or
`dask://HOST:PORT`, flows.runners) in, the pipeline, sweep or frontier flow out. Deployment
parameters stay short strings instead of a whole configuration."""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from flows.frontier import FrontierResult, frontier
from flows.pipeline import PipelineResult, pipeline
from flows.runners import LOCAL, task_runner
from flows.sweep import SweepResult, sweep
from sae_core.config import load_config


def _run_preset(
    study: Flow, preset: str, overrides: list[str] | None, store: str | None, runner: str
) -> Any:
    """`study` (the pipeline, sweep or frontier flow) on the preset's configuration."""
    config = load_config(preset, overrides or [], store)
    return study.with_options(task_runner=task_runner(runner))(config, progress=False)


@flow(name="saeflow-pipeline-preset", log_prints=True)
def pipeline_from_preset(
    preset: str = "demo",
    overrides: list[str] | None = None,
    store: str | None = None,
    runner: str = LOCAL,
) -> PipelineResult:
    return _run_preset(pipeline, preset, overrides, store, runner)


@flow(name="saeflow-sweep-preset", log_prints=True)
def sweep_from_preset(
    preset: str = "demo",
    overrides: list[str] | None = None,
    store: str | None = None,
    runner: str = LOCAL,
) -> SweepResult:
    return _run_preset(sweep, preset, overrides, store, runner)


@flow(name="saeflow-frontier-preset", log_prints=True)
def frontier_from_preset(
    preset: str = "demo",
    overrides: list[str] | None = None,
    store: str | None = None,
    runner: str = LOCAL,
) -> FrontierResult:
    return _run_preset(frontier, preset, overrides, store, runner)
