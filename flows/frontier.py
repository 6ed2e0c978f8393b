"""The frontier flow: one cached activation set; the dense TopK reference, an expander SAE per
degree and the parameter-matched dense SAEs, each trained and evaluated through the pipeline's
own cached tasks; then the storage-fidelity table and plot (sae_core.frontier)."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.pipeline import check_inputs
from sae_core.config import PipelineConfig
from sae_core.frontier import FrontierPoint, frontier_plan
from sae_core.refs import DatasetRef
from sae_core.store import default_store_uri
from tasks.caching import run_stage
from tasks.data import extract_activations, sample_tokens
from tasks.evaluate import evaluate_sae
from tasks.report import ReportRef, report_frontier
from tasks.train import train_sae
from tasks.validate import validate_activations


class FrontierResult(BaseModel):
    activations: DatasetRef
    points: list[FrontierPoint]
    states: dict[str, str]  # point label -> "train state / evaluate state" (Completed, Cached)
    table: list[dict]
    report: ReportRef


@flow(name="saeflow-frontier", log_prints=True)
def frontier(config: PipelineConfig, progress: bool = True) -> FrontierResult:
    facts = check_inputs(config)
    plan = frontier_plan(config, facts.width)  # a bad degree fails here, before any work
    store = config.store or default_store_uri()
    model, data = config.model, config.data
    evaluation = config.eval
    if not config.frontier.full_eval:  # CE recovered is all the frontier reads
        evaluation = evaluation.model_copy(update={"probe_contexts": 0, "ablation_samples": 0})
    tokens = run_stage(
        sample_tokens, store=store, model=model, data=data, progress=progress
    ).result()
    acts = run_stage(
        extract_activations, tokens=tokens, model=model, data=data, progress=progress
    ).result()
    run_stage(validate_activations, ref=acts, vocab_size=facts.vocab_size, progress=progress)
    points: list[FrontierPoint] = []
    states: dict[str, str] = {}
    for p in plan:
        trained = run_stage(train_sae, acts=acts, sae=p.sae, train=p.train, progress=progress)
        evaluated = run_stage(
            evaluate_sae,
            sae=trained.result(),
            tokens=tokens,
            model=model,
            data=data,
            eval=evaluation,
            progress=progress,
        )
        ev = evaluated.result()
        points.append(
            FrontierPoint(
                family=p.family,
                degree=p.degree,
                n=p.sae.n_latents,
                k=p.sae.k,
                seed=p.seed,
                sae=trained.result(),
                evaluation=ev.dataset,
                metrics=ev.metrics,
            )
        )
        states[p.label] = f"{trained.name} / {evaluated.name}"
    title = f"{config.name} frontier: {model.path} {model.hook}"
    report = run_stage(
        report_frontier, points=points, title=title, experiment=config.registry.experiment
    ).result()
    print(f"frontier report: {report.markdown}")
    table = report.dataset.open_store().read_json(f"{report.dataset.path}/table.json")
    return FrontierResult(
        activations=acts, points=points, states=states, table=table, report=report
    )
