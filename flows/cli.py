"""The `saeflow` command line."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from sae_core.config import ConfigError, PipelineConfig, load_config
from sae_core.store import StoreError
from sae_core.validation import ValidationFailed

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train and evaluate sparse autoencoders."
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: scripts that print figures.")
app.add_typer(bench_app, name="bench")
console = Console()

# Errors the user can fix: shown as one line, no traceback.
USER_ERRORS = (ConfigError, StoreError, ValidationFailed)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Preset name or YAML path.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override: key.path=value (repeatable).")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URI: a directory or s3://bucket/prefix.")
]


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(preset: str, overrides: list[str] | None, store: str | None) -> PipelineConfig:
    try:
        return load_config(preset, overrides or [], store)
    except USER_ERRORS as err:
        _fail(err)
        raise  # unreachable: _fail exits


@app.command()
def config(preset: PresetOpt = "demo", set_: SetOpt = None, store: StoreOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    cfg = _load(preset, set_, store)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def assets() -> None:
    """Install the demo model and corpus into the asset cache (idempotent)."""
    from sae_core.assets import ensure_assets

    ensure_assets(progress=True)


@app.command()
def run(
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the pipeline: tokens, activations, validation, training, evaluation, registration."""
    cfg = _load(preset, set_, store)
    started = time.perf_counter()
    try:
        from sae_core.preflight import preflight

        preflight(cfg)  # seconds, before Prefect and the model start
        from flows.pipeline import pipeline

        result = pipeline(cfg, progress=progress)
    except USER_ERRORS as err:
        _fail(err)
    print_summary(result, time.perf_counter() - started)


@bench_app.command("train")
def bench_train(
    d: int = 576,
    n: int = 4608,
    k: int = 32,
    batch: int = 4096,
    steps: int = 10,
    device: str = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time SAE training steps on synthetic data against one dense GEMM of the same shape."""
    import json

    from sae_core.bench import bench_train as run_bench

    result = run_bench(d=d, n=n, k=k, batch=batch, steps=steps, device=device, verbose=not json_out)
    if json_out:
        typer.echo(json.dumps(result))


def print_summary(result, seconds: float) -> None:  # noqa: ANN001 - PipelineResult, imported lazily
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("state")
    for name, state in result.stages.items():
        stages.add_row(name, state)
    metrics = Table(title="evaluation (eval split)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name, value in sorted(result.evaluation.metrics.items()):
        metrics.add_row(name, f"{value:.4g}")
    where = Table(title="outputs")
    where.add_column("what")
    where.add_column("where")
    where.add_row("tokens", result.tokens.uri)
    where.add_row("activations", result.activations.uri)
    where.add_row("sae", result.sae.uri)
    where.add_row("evaluation", result.evaluation.dataset.uri)
    reg = result.registry
    where.add_row("model", f"{reg.name} version {reg.version} @{reg.alias}")
    where.add_row("mlflow", f"{reg.tracking_uri} run {reg.run_id}")
    for table in (stages, metrics, where):
        console.print(table)
    console.print(f"finished in {seconds:.1f} s")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
