"""The sweep flow: one cached activation set, a grid of SAEs over n x k x seed trained from one
read of the data per seed and each evaluated, through the pipeline's own cached tasks, then the
scaling-law fit and the report. A transcoder's grid (sae.kind transcoder or skip_transcoder)
trains on the paired datasets of one extraction pass and is scored on its output hook."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.grid import activation_set, train_and_evaluate_all
from flows.pipeline import check_inputs
from flows.runners import local_runner
from flows.stopping import cancelled_on_stop
from sae_core.config import PipelineConfig
from sae_core.storage.refs import DatasetRef
from sae_core.studies.scaling import ScalingFit
from sae_core.studies.sweep import SweepPoint, grid
from tasks.caching import run_stage
from tasks.report import ReportRef, report_sweep
from tasks.sweep import fit_scaling


class SweepResult(BaseModel):
    tokens: DatasetRef
    activations: DatasetRef
    activations_out: DatasetRef | None  # a transcoder's target (model.hook_out), else None
    points: list[SweepPoint]
    states: dict[str, str]  # point label -> "train state / evaluate state" (Completed, Cached)
    fit: ScalingFit | None
    report: ReportRef


@flow(name="saeflow-sweep", log_prints=True, task_runner=local_runner())
@cancelled_on_stop
def sweep(config: PipelineConfig, progress: bool = True) -> SweepResult:
    points_to_run = grid(config)  # a bad grid fails here, before any work
    data = activation_set(config, check_inputs(config), progress)
    points: list[SweepPoint] = []
    states: dict[str, str] = {}
    trained = train_and_evaluate_all(
        data, config, [(p.sae, p.train) for p in points_to_run], config.eval, progress
    )
    for p, done in zip(points_to_run, trained, strict=True):
        points.append(SweepPoint(**done.study_fields(p.sae, p.seed)))
        states[f"n={p.n} k={p.k} seed={p.seed}"] = done.states
    fit = fit_scaling(points)
    if fit is not None:
        coefficients = ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items())
        print(f"scaling law fit: {coefficients}; RMS log error {fit.rmse_log:.4f}")
    hooks = " -> ".join(h for h in (config.model.hook, config.model.hook_out) if h)
    title = f"{config.name} sweep: {config.model.path} {hooks}"
    report = run_stage(
        report_sweep, points=points, fit=fit, title=title, experiment=config.registry.experiment
    ).result()
    print(f"sweep report: {report.markdown}")
    return SweepResult(
        tokens=data.tokens,
        activations=data.activations,
        activations_out=data.activations_out,
        points=points,
        states=states,
        fit=fit,
        report=report,
    )
