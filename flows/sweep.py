"""The sweep flow: one cached activation set, a grid of SAEs over n x k x seed, each trained and
evaluated through the pipeline's own cached tasks, then the scaling-law fit and the report."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.pipeline import check_inputs
from sae_core.config import PipelineConfig
from sae_core.refs import DatasetRef
from sae_core.scaling import ScalingFit
from sae_core.store import default_store_uri
from sae_core.sweep import SweepPoint, grid
from tasks.caching import run_stage
from tasks.data import extract_activations, sample_tokens
from tasks.evaluate import evaluate_sae
from tasks.report import ReportRef, report_sweep
from tasks.sweep import fit_scaling
from tasks.train import train_sae
from tasks.validate import validate_activations


class SweepResult(BaseModel):
    tokens: DatasetRef
    activations: DatasetRef
    points: list[SweepPoint]
    states: dict[str, str]  # point label -> "train state / evaluate state" (Completed, Cached)
    fit: ScalingFit | None
    report: ReportRef


@flow(name="saeflow-sweep", log_prints=True)
def sweep(config: PipelineConfig, progress: bool = True) -> SweepResult:
    points_to_run = grid(config)  # a bad grid fails here, before any work
    facts = check_inputs(config)
    store = config.store or default_store_uri()
    model, data = config.model, config.data
    tokens = run_stage(
        sample_tokens, store=store, model=model, data=data, progress=progress
    ).result()
    acts = run_stage(
        extract_activations, tokens=tokens, model=model, data=data, progress=progress
    ).result()
    run_stage(validate_activations, ref=acts, vocab_size=facts.vocab_size, progress=progress)
    points: list[SweepPoint] = []
    states: dict[str, str] = {}
    for p in points_to_run:
        trained = run_stage(train_sae, acts=acts, sae=p.sae, train=p.train, progress=progress)
        sae = trained.result()
        evaluated = run_stage(
            evaluate_sae,
            sae=sae,
            tokens=tokens,
            model=model,
            data=data,
            eval=config.eval,
            progress=progress,
        )
        ev = evaluated.result()
        points.append(
            SweepPoint(
                n=p.n, k=p.k, seed=p.seed, sae=sae, evaluation=ev.dataset, metrics=ev.metrics
            )
        )
        states[f"n={p.n} k={p.k} seed={p.seed}"] = f"{trained.name} / {evaluated.name}"
    fit = fit_scaling(points)
    if fit is not None:
        coefficients = ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items())
        print(f"scaling law fit: {coefficients}; RMS log error {fit.rmse_log:.4f}")
    title = f"{config.name} sweep: {model.path} {model.hook}"
    report = run_stage(
        report_sweep, points=points, fit=fit, title=title, experiment=config.registry.experiment
    ).result()
    print(f"sweep report: {report.markdown}")
    return SweepResult(
        tokens=tokens, activations=acts, points=points, states=states, fit=fit, report=report
    )
