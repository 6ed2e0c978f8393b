"""Prefect tasks: a run's and a sweep's report, written to the store, posted as Prefect markdown
and table artifacts, and logged to MLflow (the run's figures to the registered run; a sweep gets
its own MLflow run with one nested run per SAE)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from sae_core import stages
from sae_core.refs import DatasetRef
from sae_core.scaling import NAMES, ScalingFit
from sae_core.sweep import SweepPoint
from tasks.caching import CommittedOutput
from tasks.common import TASK_DEFAULTS
from tasks.evaluate import EvalRef
from tasks.registry import RegistryRef, _client, _experiment_id

REPORT_DIR = "report"  # artifact folder of the report in an MLflow run
SWEEP_TAG = "saeflow.sweep_report"


class ReportRef(BaseModel):
    dataset: DatasetRef
    markdown: str  # URI of report.md
    mlflow_run_id: str


def _finite(value: Any) -> Any:
    # NaN (e.g. CE recovered when ablation does not hurt) is not JSON: the table shows it empty.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _post(written: stages.WrittenReport, key: str, description: str) -> None:
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
        for name in ref.manifest()["files"]:
            Path(tmp, name).write_bytes(store.read_bytes(f"{ref.path}/{name}"))
        client.log_artifacts(run_id, tmp, REPORT_DIR)


def _ref(written: stages.WrittenReport, run_id: str) -> ReportRef:
    from sae_core.report import REPORT_FILE

    return ReportRef(
        dataset=written.ref, markdown=f"{written.ref.uri}/{REPORT_FILE}", mlflow_run_id=run_id
    )


def _locate_run(
    sae: DatasetRef, evaluation: EvalRef, registry: RegistryRef, title: str
) -> stages.Location:
    return stages.locate_run_report(sae, evaluation.dataset, title)


@task(name="report_run", cache_policy=CommittedOutput(locate=_locate_run), **TASK_DEFAULTS)
def report_run(
    sae: DatasetRef, evaluation: EvalRef, registry: RegistryRef, title: str
) -> ReportRef:
    written = stages.write_run_report(sae, evaluation.dataset, title)
    _post(written, "saeflow-run-report", f"{title}: SAE evaluation")
    _log_report(_client(), registry.run_id, written.ref)
    return _ref(written, registry.run_id)


def _locate_sweep(
    points: list[SweepPoint], fit: ScalingFit | None, title: str, experiment: str
) -> stages.Location:
    return stages.locate_sweep_report(points, fit, title)


def _sweep_run(
    client: Any,
    experiment: str,
    written: stages.WrittenReport,
    points: list[SweepPoint],
    fit: ScalingFit | None,
) -> str:
    """The sweep's MLflow run (found by the report's fingerprint, else created): the fit as
    metrics, the report as artifacts, one nested run per SAE with its params and metrics."""
    experiment_id = _experiment_id(experiment)
    tag = f"tags.`{SWEEP_TAG}` = '{written.ref.fingerprint}'"
    found = client.search_runs([experiment_id], filter_string=tag, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{written.ref.fingerprint[:8]}",
        tags={SWEEP_TAG: written.ref.fingerprint, "saeflow.report_uri": written.ref.uri},
    )
    run_id = run.info.run_id
    if fit is not None:
        for name in NAMES:
            client.log_metric(run_id, f"fit/{name}", fit.params[name])
        client.log_metric(run_id, "fit/rmse_log", fit.rmse_log)
        client.log_metric(run_id, "fit/max_rel_err", fit.max_rel_err)
    _log_report(client, run_id, written.ref)
    for p in points:
        child = client.create_run(
            experiment_id,
            run_name=f"n{p.n}-k{p.k}-s{p.seed}",
            tags={"mlflow.parentRunId": run_id, "saeflow.sae_uri": p.sae.uri},
        )
        for key, value in {"sae.n_latents": p.n, "sae.k": p.k, "train.seed": p.seed}.items():
            client.log_param(child.info.run_id, key, value)
        for key, value in p.metrics.items():
            client.log_metric(child.info.run_id, key, value)
        client.set_terminated(child.info.run_id)
    client.set_terminated(run_id)
    return run_id


@task(name="report_sweep", cache_policy=CommittedOutput(locate=_locate_sweep), **TASK_DEFAULTS)
def report_sweep(
    points: list[SweepPoint], fit: ScalingFit | None, title: str, experiment: str
) -> ReportRef:
    written = stages.write_sweep_report(points, fit, title)
    _post(written, "saeflow-sweep-report", f"{title}: {len(points)} SAEs")
    run_id = _sweep_run(_client(), experiment, written, points, fit)
    return _ref(written, run_id)
