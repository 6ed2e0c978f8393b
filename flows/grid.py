"""What the sweep and frontier flows share: one cached activation set (with a transcoder's
paired output dataset, from the same extraction pass), then the SAEs trained from one read of
the data per group of points sharing a data order, and each evaluated (and, unless
saebench.enabled is false, given SAEBench's offline evaluations), through the pipeline's own
cached tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sae_core.config import EvalConfig, PipelineConfig, SAEConfig, TrainConfig
from sae_core.data.models import ModelFacts
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import default_store_uri
from sae_core.training.group import group_by_data_order
from tasks.caching import run_stage
from tasks.data import extract_activations, pair_activations, sample_tokens
from tasks.evaluate import EvalRef, evaluate_sae
from tasks.saebench import SaeBenchRef, saebench_sae
from tasks.train import train_group_stage, train_sae
from tasks.validate import validate_activations, validate_paired


class ActivationSet(NamedTuple):
    tokens: DatasetRef
    """The sampled token contexts (train and eval splits)."""
    activations: DatasetRef
    """model.hook's validated activations."""
    activations_out: DatasetRef | None
    """A transcoder's target: model.hook_out's validated dataset, paired with `activations` row
    for row; None for an SAE."""

    def paired(self) -> dict[str, DatasetRef]:
        """The training tasks' `acts_out` argument: empty for an SAE, so that its tasks' inputs
        (and cache keys) are those of `saeflow run`."""
        return {} if self.activations_out is None else {"acts_out": self.activations_out}


class TrainedPoint(NamedTuple):
    sae: DatasetRef
    evaluation: EvalRef
    saebench: SaeBenchRef | None  # None when saebench.enabled is false
    states: str  # "train state / evaluate state[ / saebench state]" (Completed, Cached)

    def study_fields(self, sae: SAEConfig, seed: int) -> dict[str, Any]:
        """What a study records of this point (sae_core.studies.points.EvaluatedSAE's fields):
        the evaluation's figures and SAEBench's in one table."""
        return {
            "n": sae.n_latents,
            "k": sae.k,
            "seed": seed,
            "kind": sae.kind,
            "sae": self.sae,
            "evaluation": self.evaluation.dataset,
            "metrics": self.evaluation.metrics | (self.saebench.metrics if self.saebench else {}),
        }


def activation_set(config: PipelineConfig, facts: ModelFacts, progress: bool) -> ActivationSet:
    """Tokens and validated activations of `config` (and, for a transcoder, model.hook_out's
    dataset from the same pass, checked to pair and validated), computed or from the cache."""
    store = config.store or default_store_uri()
    model, data = config.model, config.data
    tokens = run_stage(
        sample_tokens, store=store, model=model, data=data, progress=progress
    ).result()
    acts = run_stage(
        extract_activations, tokens=tokens, model=model, data=data, progress=progress
    ).result()
    run_stage(validate_activations, ref=acts, vocab_size=facts.vocab_size, progress=progress)
    acts_out = None
    if model.hook_out is not None:
        acts_out = run_stage(
            pair_activations, acts=acts, tokens=tokens, model=model, data=data, progress=progress
        ).result()
        run_stage(validate_paired, ref=acts_out, vocab_size=facts.vocab_size, progress=progress)
    return ActivationSet(tokens, acts, acts_out)


def train_and_evaluate(
    data: ActivationSet,
    config: PipelineConfig,
    sae: SAEConfig,
    train: TrainConfig,
    evaluation: EvalConfig,
    progress: bool,
) -> TrainedPoint:
    """One SAE (or transcoder, from `data`'s paired datasets) trained on `data`, evaluated on
    its eval split and (config.saebench.enabled) by SAEBench's offline evaluations, each stage
    cached."""
    trained = run_stage(
        train_sae, acts=data.activations, sae=sae, train=train, progress=progress, **data.paired()
    )
    evaluated = run_stage(
        evaluate_sae,
        sae=trained.result(),
        tokens=data.tokens,
        model=config.model,
        data=config.data,
        eval=evaluation,
        progress=progress,
    )
    states = f"{trained.state.name} / {evaluated.state.name}"
    bench = None
    if config.saebench.enabled:
        benched = run_stage(
            saebench_sae,
            sae=trained.result(),
            tokens=data.tokens,
            model=config.model,
            data=config.data,
            eval=evaluation,
            saebench=config.saebench,
            progress=progress,
        )
        bench, states = benched.result(), f"{states} / {benched.state.name}"
    return TrainedPoint(trained.result(), evaluated.result(), bench, states)


def train_and_evaluate_all(
    data: ActivationSet,
    config: PipelineConfig,
    points: Sequence[tuple[SAEConfig, TrainConfig]],
    evaluation: EvalConfig,
    progress: bool,
) -> list[TrainedPoint]:
    """Every point trained on `data` and evaluated, in order.

    The points that share a data order (`sae_core.training.group.data_order`) and are not on the store
    yet train together, reading the data once per group; then each point goes through the
    cached train and evaluate tasks as before (its SAE is committed by then, so a train task
    that misses the cache only reads the manifest): per-point cache hits, states and results
    are those of training each point alone.
    """
    for group in group_by_data_order(points):
        train_group_stage(
            data.activations, [points[i] for i in group], progress, data.activations_out
        )
    return [train_and_evaluate(data, config, *p, evaluation, progress) for p in points]
