"""The frontier flow: one cached activation set; the dense TopK reference, an expander SAE per
degree and the parameter-matched dense SAEs, trained from one read of the data per seed and
each evaluated, through the pipeline's own cached tasks; then the storage-fidelity table and
plot (sae_core.studies.frontier)."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.grid import activation_set, train_and_evaluate_all
from flows.pipeline import check_inputs
from flows.runners import local_runner
from flows.stopping import cancelled_on_stop
from sae_core.config import PipelineConfig
from sae_core.storage.refs import DatasetRef
from sae_core.studies.frontier import FrontierPoint, frontier_plan
from tasks.caching import run_stage
from tasks.report import ReportRef, report_frontier


class FrontierResult(BaseModel):
    activations: DatasetRef
    points: list[FrontierPoint]
    states: dict[str, str]  # point label -> "train state / evaluate state" (Completed, Cached)
    table: list[dict]
    report: ReportRef


@flow(name="saeflow-frontier", log_prints=True, task_runner=local_runner())
@cancelled_on_stop
def frontier(config: PipelineConfig, progress: bool = True) -> FrontierResult:
    facts = check_inputs(config)
    plan = frontier_plan(config, facts.width)  # a bad degree fails here, before any work
    evaluation = config.eval
    if not config.frontier.full_eval:  # CE recovered is all the frontier reads
        evaluation = evaluation.model_copy(update={"probe_contexts": 0, "ablation_samples": 0})
    data = activation_set(config, facts, progress)
    points: list[FrontierPoint] = []
    states: dict[str, str] = {}
    trained = train_and_evaluate_all(
        data, config, [(p.sae, p.train) for p in plan], evaluation, progress
    )
    for p, done in zip(plan, trained, strict=True):
        fields = done.study_fields(p.sae, p.seed)
        points.append(FrontierPoint(family=p.family, degree=p.degree, **fields))
        states[p.label] = done.states
    title = f"{config.name} frontier: {config.model.path} {config.model.hook}"
    report = run_stage(
        report_frontier, points=points, title=title, experiment=config.registry.experiment
    ).result()
    print(f"frontier report: {report.markdown}")
    table = report.dataset.open_store().read_json(f"{report.dataset.path}/table.json")
    return FrontierResult(
        activations=data.activations, points=points, states=states, table=table, report=report
    )
