"""Stages `run_report`, `sweep_report` and `frontier_report`: report.md, its figures and
table.json (sae_core.studies) for one SAE, a sweep's grid or a frontier, from the manifests and
files of the trained and evaluated SAEs."""

from __future__ import annotations

from typing import Any, NamedTuple

from sae_core.evaluation.metrics import DensityHistogram
from sae_core.stages.location import Location, located
from sae_core.storage.manifests import EvaluationManifest, ReportManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.studies import convergence, frontier, plots, report, scaling, sweep
from sae_core.studies.frontier import FrontierPoint, FrontierRow, frontier_summary, frontier_table
from sae_core.studies.report import REPORT_FILE, Report, frontier_report, run_report, sweep_report
from sae_core.studies.scaling import ScalingFit
from sae_core.studies.sweep import SweepPoint, SweepRow

CODE = (report, plots, scaling, sweep, convergence)


class WrittenReport(NamedTuple):
    """A report on the store, with what the orchestrator posts of it."""

    ref: DatasetRef
    """The committed report dataset."""
    markdown: str
    """report.md's text."""
    table: list[dict[str, Any]]
    """table.json: one row per SAE (or one row for a run)."""


def _write_report(store: Store, loc: Location, report: Report, kind: str) -> WrittenReport:

    with store.writing(loc.path) as writer:
        for name, png in report.images.items():
            writer.write_bytes(name, png)
        writer.write_bytes(REPORT_FILE, report.markdown.encode())
        writer.write_json("table.json", report.table)
        writer.manifest = ReportManifest(
            kind=kind,
            fingerprint=loc.fingerprint,
            files=[REPORT_FILE, "table.json", *report.images],
        )
    return WrittenReport(loc.ref(), report.markdown, report.table)


def _read_report(store: Store, loc: Location) -> WrittenReport:

    markdown = store.read_bytes(f"{loc.path}/{REPORT_FILE}").decode()
    return WrittenReport(loc.ref(), markdown, store.read_json(f"{loc.path}/table.json"))


def locate_run_report(sae: DatasetRef, evaluation: DatasetRef, title: str) -> Location:
    return located(
        "run_report", sae.store, sae.fingerprint, evaluation.fingerprint, title, code=CODE
    )


def write_run_report(sae: DatasetRef, evaluation: DatasetRef, title: str) -> WrittenReport:
    """report.md, its figures and table.json for one trained, evaluated SAE."""

    loc = locate_run_report(sae, evaluation, title)
    store = Store(sae.store)
    if loc.is_committed():
        return _read_report(store, loc)
    sae_m, eval_m = sae.manifest(SaeManifest), evaluation.manifest(EvaluationManifest)
    probes = [
        {k: p[k] for k in ("task", "latent", "loss", "baseline_loss", "positives")}
        for p in store.read_json(f"{evaluation.path}/probes.json")
    ]
    report = run_report(
        title,
        sae_m.model_dump(include={"d", "n", "k", "tokens_seen", "steps"}),
        eval_m.metrics,
        probes,
        store.read_json(f"{sae.path}/history.json"),
        DensityHistogram(**store.read_json(f"{evaluation.path}/density_histogram.json")),
        eval_m.seconds,
        {"sae": sae.uri, "evaluation": evaluation.uri},
    )
    return _write_report(store, loc, report, "run_report")


def locate_sweep_report(points: list[SweepPoint], fit: ScalingFit | None, title: str) -> Location:
    return located(
        "sweep_report",
        points[0].sae.store,
        [(p.n, p.k, p.seed, p.evaluation.fingerprint) for p in points],
        fit,
        title,
        code=CODE,
    )


def write_sweep_report(
    points: list[SweepPoint], fit: ScalingFit | None, title: str
) -> WrittenReport:
    """report.md, the sweep figures and table.json for a grid of trained, evaluated SAEs."""

    loc = locate_sweep_report(points, fit, title)
    store = Store(points[0].sae.store)
    if loc.is_committed():
        return _read_report(store, loc)
    rows, histories = [], []
    for p in points:
        train_dead = p.sae.manifest(SaeManifest).dead_fraction
        rows.append(SweepRow(p.n, p.k, p.seed, p.kind, p.metrics, train_dead))
        histories.append((rows[-1].label, store.read_json(f"{p.sae.path}/history.json")))
    report = sweep_report(title, rows, fit, histories)
    return _write_report(store, loc, report, "sweep_report")


def locate_frontier_report(points: list[FrontierPoint], title: str) -> Location:
    return located(
        "frontier_report",
        points[0].sae.store,
        [(p.family, p.degree, p.n, p.k, p.seed, p.evaluation.fingerprint) for p in points],
        title,
        code=(*CODE, frontier),
    )


def write_frontier_report(points: list[FrontierPoint], title: str) -> WrittenReport:
    """report.md, the frontier plot and table.json for the frontier's trained, evaluated SAEs;
    their storage figures come from their manifests (written by training)."""

    loc = locate_frontier_report(points, title)
    store = Store(points[0].sae.store)
    if loc.is_committed():
        return _read_report(store, loc)
    rows = []
    for p in points:
        storage = p.sae.manifest(SaeManifest).storage
        rows.append(
            FrontierRow(
                p.family,
                p.degree,
                p.n,
                p.k,
                p.seed,
                p.metrics,
                storage.decoder_values,
                storage.artifact_bytes,
            )  # fmt: skip
        )
    table = frontier_table(rows)
    report = frontier_report(title, table, frontier_summary(table))
    return _write_report(store, loc, report, "frontier_report")
