"""The main flow: tokens -> activations -> validation -> training -> evaluation -> registry ->
latent statistics (the viewer's data, explainability logged to the registered run) -> report."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.runners import local_runner
from flows.stopping import cancelled_on_stop
from sae_core.config import PipelineConfig
from sae_core.data.models import ModelFacts
from sae_core.storage.manifests import ValidationManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import default_store_uri
from sae_core.training.preflight import preflight
from tasks.caching import run_stage
from tasks.data import extract_activations, sample_tokens
from tasks.evaluate import EvalRef, evaluate_sae
from tasks.latents import LatentsRef, latent_stats
from tasks.registry import RegistryRef, register_model
from tasks.report import ReportRef, report_run
from tasks.train import train_sae
from tasks.validate import validate_activations


class PipelineResult(BaseModel):
    """What a run produced: references, figures, and whether each stage ran or came from cache."""

    stages: dict[str, str]
    tokens: DatasetRef
    activations: DatasetRef
    validation: ValidationManifest  # the validation's outcome: its committed manifest
    sae: DatasetRef
    evaluation: EvalRef
    registry: RegistryRef
    latents: LatentsRef
    report: ReportRef


@task(name="preflight", cache_policy=NO_CACHE)
def check_inputs(config: PipelineConfig) -> ModelFacts:
    return preflight(config)


class _Stages:
    """Runs stage tasks in order and remembers how each ended (Completed or Cached)."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def __call__(self, task: Any, **inputs: Any) -> Any:
        state = run_stage(task, **inputs)
        self.states[task.name] = state.name
        return state.result()


@flow(name="saeflow-pipeline", log_prints=True, task_runner=local_runner())
@cancelled_on_stop
def pipeline(config: PipelineConfig, progress: bool = True) -> PipelineResult:
    run = _Stages()
    facts = check_inputs(config)
    store = config.store or default_store_uri()
    tokens = run(
        sample_tokens, store=store, model=config.model, data=config.data, progress=progress
    )
    acts = run(
        extract_activations, tokens=tokens, model=config.model, data=config.data, progress=progress
    )
    validation = run(validate_activations, ref=acts, vocab_size=facts.vocab_size, progress=progress)
    sae = run(train_sae, acts=acts, sae=config.sae, train=config.train, progress=progress)
    evaluation = run(
        evaluate_sae,
        sae=sae,
        tokens=tokens,
        model=config.model,
        data=config.data,
        eval=config.eval,
        progress=progress,
    )
    registry = run(
        register_model, sae=sae, evaluation=evaluation, config=config, registry=config.registry
    )
    latents = run(
        latent_stats, sae=sae, latents=config.latents, registry=registry, progress=progress
    )
    cfg = config
    title = f"{cfg.name}: {cfg.model.path} {cfg.model.hook}, n={cfg.sae.n_latents}, k={cfg.sae.k}"
    report = run(report_run, sae=sae, evaluation=evaluation, registry=registry, title=title)
    print(f"report: {report.markdown}")
    return PipelineResult(
        stages=run.states,
        tokens=tokens,
        activations=acts,
        validation=validation,
        sae=sae,
        evaluation=evaluation,
        registry=registry,
        latents=latents,
        report=report,
    )
