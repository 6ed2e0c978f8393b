"""Prefect tasks: a run's and a sweep's report, written to the store, posted as Prefect markdown
and table artifacts, and logged to MLflow (the run's figures to the registered run; a sweep gets
its own MLflow run with one nested run per SAE)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from sae_core.stages import location as location_stage
from sae_core.stages import report as report_stage
from sae_core.storage.manifests import ReportManifest
from sae_core.storage.refs import DatasetRef
from sae_core.studies.frontier import FrontierPoint
from sae_core.studies.scaling import NAMES, ScalingFit
from sae_core.studies.sweep import SweepPoint
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS
from tasks.evaluate import EvalRef
from tasks.registry import RegistryRef
from tasks.tracking import experiment_id, mlflow_client

REPORT_DIR = "report"  # artifact folder of the report in an MLflow run
SWEEP_TAG = "saeflow.sweep_report"
FRONTIER_TAG = "saeflow.frontier_report"
_IDENTITY = ("family", "degree", "n", "k", "seed")  # a frontier row's params, not its figures


class ReportRef(BaseModel):
    dataset: DatasetRef
    markdown: str  # URI of report.md
    mlflow_run_id: str


def _finite(value: Any) -> Any:
    # NaN (e.g. CE recovered when ablation does not hurt) is not JSON: the table shows it empty.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _post(written: report_stage.WrittenReport, key: str, description: str) -> None:
    """Prefect artifacts (keys: lowercase letters, digits and dashes)."""
    create_markdown_artifact(key=key, markdown=written.markdown, description=description)
    table = [{k: _finite(v) for k, v in row.items()} for row in written.table]
    create_table_artifact(key=f"{key}-table", table=table, description=description)


def _log_report(client: Any, run_id: str, ref: DatasetRef) -> None:
    """The report folder as the run's `report/` artifacts, unless a retry already put it there."""
    if client.list_artifacts(run_id, REPORT_DIR):
        return
    store = ref.open_store()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ref.manifest(ReportManifest).files:
            Path(tmp, name).write_bytes(store.read_bytes(f"{ref.path}/{name}"))
        client.log_artifacts(run_id, tmp, REPORT_DIR)


def _ref(written: report_stage.WrittenReport, run_id: str) -> ReportRef:
    from sae_core.studies.report import REPORT_FILE

    return ReportRef(
        dataset=written.ref, markdown=f"{written.ref.uri}/{REPORT_FILE}", mlflow_run_id=run_id
    )


def _locate_run(
    sae: DatasetRef, evaluation: EvalRef, registry: RegistryRef, title: str
) -> location_stage.Location:
    return report_stage.locate_run_report(sae, evaluation.dataset, title)


@task(name="report_run", cache_policy=CommittedOutput(locate=_locate_run), **TASK_DEFAULTS)
def report_run(
    sae: DatasetRef, evaluation: EvalRef, registry: RegistryRef, title: str
) -> ReportRef:
    written = report_stage.write_run_report(sae, evaluation.dataset, title)
    _post(written, "saeflow-run-report", f"{title}: SAE evaluation")
    _log_report(mlflow_client(), registry.run_id, written.ref)
    return _ref(written, registry.run_id)


def _locate_sweep(
    points: list[SweepPoint], fit: ScalingFit | None, title: str, experiment: str
) -> location_stage.Location:
    return report_stage.locate_sweep_report(points, fit, title)


class ChildRun(NamedTuple):
    """One SAE of a sweep or frontier, as a nested MLflow run."""

    name: str
    sae_uri: str
    params: dict[str, Any]
    metrics: dict[str, float]


def _grid_run(
    client: Any,
    experiment: str,
    written: report_stage.WrittenReport,
    tag: str,
    metrics: dict[str, float],
    children: list[ChildRun],
) -> str:
    """The MLflow run of a sweep or frontier report (found by its tag and the report's
    fingerprint, else created): `metrics`, the report as artifacts, one nested run per SAE."""
    exp_id = experiment_id(experiment)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{tag}` = '{written.ref.fingerprint}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    kind = tag.removeprefix("saeflow.").removesuffix("_report")
    run = client.create_run(
        exp_id,
        run_name=f"{kind}-{written.ref.fingerprint[:8]}",
        tags={tag: written.ref.fingerprint, "saeflow.report_uri": written.ref.uri},
    )
    run_id = run.info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    _log_report(client, run_id, written.ref)
    for c in children:
        child = client.create_run(
            exp_id,
            run_name=c.name,
            tags={"mlflow.parentRunId": run_id, "saeflow.sae_uri": c.sae_uri},
        )
        for key, value in c.params.items():
            client.log_param(child.info.run_id, key, value)
        for key, value in c.metrics.items():
            if math.isfinite(value):
                client.log_metric(child.info.run_id, key, value)
        client.set_terminated(child.info.run_id)
    client.set_terminated(run_id)
    return run_id


@task(name="report_sweep", cache_policy=CommittedOutput(locate=_locate_sweep), **TASK_DEFAULTS)
def report_sweep(
    points: list[SweepPoint], fit: ScalingFit | None, title: str, experiment: str
) -> ReportRef:
    written = report_stage.write_sweep_report(points, fit, title)
    _post(written, "saeflow-sweep-report", f"{title}: {len(points)} SAEs")
    metrics = {}
    if fit is not None:
        metrics = {f"fit/{name}": fit.params[name] for name in NAMES} | {
            "fit/rmse_log": fit.rmse_log,
            "fit/max_rel_err": fit.max_rel_err,
        }
    children = [
        ChildRun(
            f"n{p.n}-k{p.k}-s{p.seed}",
            p.sae.uri,
            {"sae.kind": p.kind, "sae.n_latents": p.n, "sae.k": p.k, "train.seed": p.seed},
            p.metrics,
        )
        for p in points
    ]
    run_id = _grid_run(mlflow_client(), experiment, written, SWEEP_TAG, metrics, children)
    return _ref(written, run_id)


def _locate_frontier(
    points: list[FrontierPoint], title: str, experiment: str
) -> location_stage.Location:
    return report_stage.locate_frontier_report(points, title)


@task(
    name="report_frontier", cache_policy=CommittedOutput(locate=_locate_frontier), **TASK_DEFAULTS
)
def report_frontier(points: list[FrontierPoint], title: str, experiment: str) -> ReportRef:
    """The frontier's report on the store, as Prefect artifacts, and as an MLflow run whose
    nested runs carry each SAE's row of the table (compression, retained, ...)."""
    written = report_stage.write_frontier_report(points, title)
    _post(written, "saeflow-frontier-report", f"{title}: {len(points)} SAEs")
    children = []
    for p, row in zip(points, written.table, strict=True):
        params = {"family": p.family, "sae.degree": p.degree, "sae.n_latents": p.n,
                  "sae.k": p.k, "train.seed": p.seed}  # fmt: skip
        figures = {k: float(v) for k, v in row.items() if k not in _IDENTITY}
        children.append(ChildRun(p.label.replace(" ", "-"), p.sae.uri, params, figures))
    run_id = _grid_run(mlflow_client(), experiment, written, FRONTIER_TAG, {}, children)
    return _ref(written, run_id)
