"""The tables `run`, `sweep` and `frontier` print when their flow has finished."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from flows.cli.console import console

if TYPE_CHECKING:
    from flows.frontier import FrontierResult
    from flows.pipeline import PipelineResult
    from flows.sweep import SweepResult
    from tasks.report import ReportRef


def print_summary(result: PipelineResult, seconds: float) -> None:
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("outcome")
    for name, state in result.stages.items():
        stages.add_row(name, state)
    metrics = Table(title="evaluation (eval split)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    bench = result.saebench.metrics if result.saebench else {}
    figures = {**result.evaluation.metrics, **bench, **result.latents.metrics}
    for name, value in sorted(figures.items()):
        metrics.add_row(name, f"{value:.4g}")
    where = Table(title="outputs")
    where.add_column("what")
    where.add_column("where")
    where.add_row("tokens", result.tokens.uri)
    where.add_row("activations", result.activations.uri)
    where.add_row("sae", result.sae.uri)
    where.add_row("evaluation", result.evaluation.dataset.uri)
    if result.saebench:
        where.add_row("saebench", result.saebench.dataset.uri)
    where.add_row("latents (saeflow view)", result.latents.dataset.uri)
    reg = result.registry
    where.add_row("model", f"{reg.name} version {reg.version} (this run's)")
    where.add_row("aliases (registry, now)", registry_aliases(reg.name))
    where.add_row("mlflow", f"{reg.tracking_uri} run {reg.run_id}")
    for table in (stages, metrics, where):
        console.print(table)
    console.print(f"finished in {seconds:.1f} s")


def registry_aliases(name: str) -> str:
    """The model's aliases as the registry holds them when the summary prints (read now, not
    remembered from the run: another run may have moved them since)."""
    from tasks.registry import MlflowRegistry

    try:
        aliases = MlflowRegistry().aliases(name)
    except Exception as err:  # noqa: BLE001 - the summary still prints without a registry
        return (
            f"registry unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        )
    return ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"


def print_sweep_summary(result: SweepResult, seconds: float) -> None:
    from sae_core.studies.report import SWEEP_COLUMNS
    from sae_core.studies.scaling import PAPER

    # Short headers and states keep the table readable in 80 columns; report.md has it all.
    short = {"dead_fraction": "dead", "ce_loss_recovered": "CE rec", "kl_spliced": "KL",
             "ablation_sparsity": "abl sp", "probe_loss": "probe"}  # fmt: skip
    points = Table(title=f"{result.points[0].kind} sweep (eval split)")
    for name in ("n", "k", "seed", *(short.get(c, c) for c in SWEEP_COLUMNS), "stages"):
        points.add_column(name, justify="right")
    for p in result.points:
        label = f"n={p.n} k={p.k} seed={p.seed}"
        values = [f"{p.metrics.get(c, float('nan')):.3g}" for c in SWEEP_COLUMNS]
        states = result.states[label].replace("Completed", "ran").replace("Cached", "cached")
        points.add_row(str(p.n), str(p.k), str(p.seed), *values, states.replace(" ", ""))
    console.print(points)
    if result.fit is not None:
        law = "exp(a + b_k ln k + b_n ln n + g ln k ln n) + exp(z + e ln k)"
        fit = Table(title=f"scaling law L(n, k) = {law}")
        fit.add_column("coefficient")
        fit.add_column("fitted", justify="right")
        fit.add_column("paper (GPT-4)", justify="right")
        for (name, value), paper in zip(result.fit.params.items(), PAPER, strict=True):
            fit.add_row(name, f"{value:.4g}", f"{paper:.4g}")
        console.print(fit)
        loo = result.fit.loo_rel_err
        console.print(
            f"fit error: RMS log error {result.fit.rmse_log:.4f}, max relative error "
            f"{result.fit.max_rel_err:.2%}"
            + ("" if loo is None else f", leave-one-out mean relative error {loo:.2%}")
        )
    _print_study_footer(result.report, seconds)


def print_frontier_summary(result: FrontierResult, seconds: float) -> None:
    table = Table(title="storage-fidelity frontier (eval split)")
    columns = {"family": "{}", "degree": "{}", "n": "{}", "k": "{}", "seed": "{}",
               "compression": "{:.1f}x", "bytes_ratio": "{:.1f}x", "ce_loss_recovered": "{:.3f}",
               "retained": "{:.1%}", "dead_fraction": "{:.3f}"}  # fmt: skip
    for name in columns:
        table.add_column(name.replace("_", " "), justify="right")
    for row in result.table:
        table.add_row(*(fmt.format(row[name]) for name, fmt in columns.items()))
    console.print(table)
    _print_study_footer(result.report, seconds)


def _print_study_footer(report: ReportRef, seconds: float) -> None:
    console.print(f"report: {report.markdown}")
    console.print(f"mlflow run: {report.mlflow_run_id}")
    console.print(f"finished in {seconds:.1f} s")
