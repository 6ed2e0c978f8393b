"""The main flow: tokens -> activations -> validation -> training -> evaluation -> SAEBench's
offline evaluations (unless saebench.enabled is false) -> registry ->
latent statistics (the viewer's data, explainability logged to the registered run) -> report.

The registration is a cached stage; moving the `challenger` alias is not: `nominate_version`
runs on every run and decides from the registry alone (tasks/promote.py)."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.runners import local_runner
from flows.stopping import cancelled_on_stop
from sae_core.config import PipelineConfig
from sae_core.data.models import ModelFacts
from sae_core.evaluation.promotion import Nomination
from sae_core.stages.evaluate import check_probe_corpus
from sae_core.storage.manifests import SaeManifest, ValidationManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import default_store_uri
from sae_core.training.preflight import preflight
from tasks.caching import COMPUTED, run_stage
from tasks.data import extract_activations, pair_activations, sample_tokens
from tasks.evaluate import EvalRef, evaluate_sae
from tasks.latents import LatentsRef, latent_stats
from tasks.promote import nominate_version
from tasks.refresh import Refresh, checked_stages
from tasks.registry import RegistryRef, register_model
from tasks.report import ReportRef, report_run
from tasks.saebench import SaeBenchRef, saebench_sae
from tasks.train import train_sae
from tasks.validate import validate_activations, validate_paired


class PipelineResult(BaseModel):
    """What a run produced: references, figures, and how each stage ended."""

    stages: dict[str, str]  # stage -> computed | cached | reused from ... | resumed from N tokens
    seconds: dict[str, float]  # stage -> its wall time in this run (a cached stage's: the lookup)
    tokens: DatasetRef
    activations: DatasetRef
    validation: ValidationManifest  # the validation's outcome: its committed manifest
    sae: DatasetRef
    evaluation: EvalRef
    saebench: SaeBenchRef | None  # None when saebench.enabled is false
    registry: RegistryRef
    nomination: Nomination  # what this run did to the `challenger` alias
    latents: LatentsRef
    report: ReportRef


@task(name="preflight", cache_policy=NO_CACHE)
def check_inputs(config: PipelineConfig) -> ModelFacts:
    facts = preflight(config)
    check_probe_corpus(config.data, config.eval)
    return facts


# The stage tasks, in the order the flow runs them: the names `--refresh` takes.
STAGES = tuple(
    t.name
    for t in (sample_tokens, extract_activations, validate_activations, pair_activations,
              validate_paired, train_sae, evaluate_sae, saebench_sae, register_model, latent_stats,
              report_run)
)  # fmt: skip


class _Stages:
    """Runs stage tasks in order, recomputing those `refresh` wants; remembers how each ended
    (tasks.caching's outcomes; a training that resumed says from how many tokens) and its wall
    time, and logs each start and end to the run's logger: a deployment run shows its progress
    in the worker's log and the Prefect UI."""

    def __init__(self, refresh: Refresh) -> None:
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.refresh = refresh
        self.log = get_run_logger()

    def __call__(self, task: Any, **inputs: Any) -> Any:
        self.log.info("stage %s: started", task.name)
        started = time.monotonic()
        recompute = self.refresh.wants(task.name, inputs)
        stage = run_stage(task, refresh=recompute, **inputs)
        result = stage.result()
        if recompute:
            self.refresh.recomputed(result)
        outcome = stage.outcome
        if task.name == "train_sae" and outcome == COMPUTED:
            resumed = result.manifest(SaeManifest).resumed_from_tokens
            outcome = f"resumed from {resumed} tokens" if resumed else outcome
        self.states[task.name] = outcome
        self.seconds[task.name] = time.monotonic() - started
        self.log.info("stage %s: %s in %.1f s", task.name, outcome, self.seconds[task.name])
        return result


@flow(name="saeflow-pipeline", log_prints=True, task_runner=local_runner())
@cancelled_on_stop
def pipeline(
    config: PipelineConfig, progress: bool = True, refresh: list[str] | None = None
) -> PipelineResult:
    """The pipeline; `refresh`: stages (of STAGES, or `all`) to recompute with everything
    downstream of them, although their outputs are committed."""
    run = _Stages(Refresh(checked_stages(refresh or [], STAGES)))
    facts = check_inputs(config)
    store = config.store or default_store_uri()
    tokens = run(
        sample_tokens, store=store, model=config.model, data=config.data, progress=progress
    )
    acts = run(
        extract_activations, tokens=tokens, model=config.model, data=config.data, progress=progress
    )
    validation = run(validate_activations, ref=acts, vocab_size=facts.vocab_size, progress=progress)
    paired = {}  # a transcoder's target: model.hook_out's dataset, from the same pass
    if config.model.hook_out is not None:
        paired["acts_out"] = run(
            pair_activations,
            acts=acts,
            tokens=tokens,
            model=config.model,
            data=config.data,
            progress=progress,
        )
        run(validate_paired, ref=paired["acts_out"], vocab_size=facts.vocab_size, progress=progress)
    sae = run(train_sae, acts=acts, sae=config.sae, train=config.train, progress=progress, **paired)
    evaluation = run(
        evaluate_sae,
        sae=sae,
        tokens=tokens,
        model=config.model,
        data=config.data,
        eval=config.eval,
        progress=progress,
    )
    bench = None
    if config.saebench.enabled:
        bench = run(
            saebench_sae,
            sae=sae,
            tokens=tokens,
            model=config.model,
            data=config.data,
            eval=config.eval,
            saebench=config.saebench,
            progress=progress,
        )
    registry = run(
        register_model,
        sae=sae,
        evaluation=evaluation,
        config=config,
        registry=config.registry,
        saebench=bench,
    )
    nomination = nominate_version(registry, config.registry.alias)
    latents = run(
        latent_stats, sae=sae, latents=config.latents, registry=registry, progress=progress
    )
    cfg = config
    title = f"{cfg.name}: {cfg.model.path} {cfg.model.hook}, n={cfg.sae.n_latents}, k={cfg.sae.k}"
    report = run(report_run, sae=sae, evaluation=evaluation, registry=registry, title=title)
    print(f"report: {report.markdown}")
    return PipelineResult(
        stages=run.states,
        seconds=run.seconds,
        tokens=tokens,
        activations=acts,
        validation=validation,
        sae=sae,
        evaluation=evaluation,
        saebench=bench,
        registry=registry,
        nomination=nomination,
        latents=latents,
        report=report,
    )
