"""The main flow: tokens -> activations -> validation -> training -> evaluation -> registry."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sae_core.config import PipelineConfig
from sae_core.preflight import ModelFacts, preflight
from sae_core.refs import DatasetRef
from sae_core.store import default_store_uri
from tasks.data import extract_activations, sample_tokens
from tasks.evaluate import EvalRef, evaluate_sae
from tasks.registry import RegistryRef, register_model
from tasks.train import train_sae
from tasks.validate import ValidationReport, validate_activations


class PipelineResult(BaseModel):
    """What a run produced: references, figures, and whether each stage ran or came from cache."""

    stages: dict[str, str]
    tokens: DatasetRef
    activations: DatasetRef
    validation: ValidationReport
    sae: DatasetRef
    evaluation: EvalRef
    registry: RegistryRef


@task(name="preflight", cache_policy=NO_CACHE)
def check_inputs(config: PipelineConfig) -> ModelFacts:
    return preflight(config)


def _resolved(states: dict[str, str], name: str, state: Any) -> Any:
    states[name] = state.name
    return state.result()


@flow(name="saeflow-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, progress: bool = True) -> PipelineResult:
    stages: dict[str, str] = {}
    facts = check_inputs(config)
    store = config.store or default_store_uri()
    tokens = _resolved(
        stages,
        "sample_tokens",
        sample_tokens(store, config.model, config.data, progress, return_state=True),
    )
    acts = _resolved(
        stages,
        "extract_activations",
        extract_activations(tokens, config.model, config.data, progress, return_state=True),
    )
    validation = _resolved(
        stages, "validate", validate_activations(acts, facts.vocab_size, return_state=True)
    )
    sae = _resolved(
        stages, "train_sae", train_sae(acts, config.sae, config.train, progress, return_state=True)
    )
    evaluation = _resolved(
        stages,
        "evaluate_sae",
        evaluate_sae(
            sae, tokens, config.model, config.data, config.eval, progress, return_state=True
        ),
    )
    registry = _resolved(
        stages,
        "register_model",
        register_model(sae, evaluation, config, config.registry, return_state=True),
    )
    return PipelineResult(
        stages=stages,
        tokens=tokens,
        activations=acts,
        validation=validation,
        sae=sae,
        evaluation=evaluation,
        registry=registry,
    )
