"""The pipeline's stages as plain functions over the store, each idempotent.

Every stage names its output folder by a fingerprint of its inputs and of the code that makes
it (`locate_*`), returns the committed dataset when it is already there, and otherwise computes
it inside `Store.writing` (data first, manifest last). Orchestrators wrap these one to one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sae_core.assets import resolve_corpus, resolve_model_path
from sae_core.config import DataConfig, EvalConfig, ModelConfig, SAEConfig, TrainConfig
from sae_core.fingerprint import code_fingerprint, fingerprint, path_fingerprint
from sae_core.refs import DatasetRef
from sae_core.store import Store


class Location(NamedTuple):
    """Where a stage's output lives: the store URI, the dataset folder and its fingerprint."""

    store: str
    path: str
    fingerprint: str

    def ref(self, rows: int = 0) -> DatasetRef:
        return DatasetRef(store=self.store, path=self.path, fingerprint=self.fingerprint, rows=rows)

    def committed(self) -> dict[str, Any] | None:
        return Store(self.store).manifest(self.path)


def _located(stage: str, store: str, *inputs: Any, code: tuple[str, ...]) -> Location:
    fp = fingerprint(stage, *inputs, code_fingerprint(*code))
    return Location(store=store, path=f"{stage}/{fp}", fingerprint=fp)


def _model_identity(model: ModelConfig) -> dict[str, Any]:
    path = resolve_model_path(model.path)
    return {"path": model.path, "content": path_fingerprint(path)}


# tokens --------------------------------------------------------------------------------------
_TOKEN_FIELDS = {"corpus", "text_column", "context_len", "train_tokens", "eval_tokens", "seed"}


def locate_tokens(store: str, model: ModelConfig, data: DataConfig) -> Location:
    corpus = resolve_corpus(data.corpus)
    return _located(
        "tokens",
        store,
        data.model_dump(include=_TOKEN_FIELDS),
        path_fingerprint(corpus) if isinstance(corpus, list) else corpus,
        _model_identity(model),  # the tokenizer lives with the model
        code=("sae_core.tokens",),
    )


def sample_tokens(
    store: str, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    from transformers import AutoTokenizer

    from sae_core import tokens

    loc = locate_tokens(store, model, data)
    if (manifest := loc.committed()) is not None:
        return loc.ref(manifest["splits"]["train"]["tokens"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model.path))
    with Store(store).writing(loc.path) as writer:
        manifest = tokens.sample_tokens(
            data, tokenizer, resolve_corpus(data.corpus), writer, progress
        )
        manifest["fingerprint"] = loc.fingerprint
    return loc.ref(manifest["splits"]["train"]["tokens"])


# activations ---------------------------------------------------------------------------------
_ACTIVATION_FIELDS = {
    "skip_first_position",
    "max_norm",
    "batch_contexts",
    "shard_rows",
    "storage_dtype",
}


def locate_activations(tokens: DatasetRef, model: ModelConfig, data: DataConfig) -> Location:
    return _located(
        "activations",
        tokens.store,
        tokens.fingerprint,
        _model_identity(model),
        model.hook,
        model.dtype,
        data.model_dump(include=_ACTIVATION_FIELDS),
        code=("sae_core.activations", "sae_core.models"),
    )


def extract_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    from sae_core import activations
    from sae_core.models import load_model

    loc = locate_activations(tokens, model, data)
    if (manifest := loc.committed()) is not None:
        return loc.ref(manifest["splits"]["train"]["rows"])
    loaded = load_model(resolve_model_path(model.path), model.dtype, model.device)
    with Store(tokens.store).writing(loc.path) as writer:
        manifest = activations.extract_activations(
            loaded.model, tokens, data, model.hook, writer, progress
        )
        manifest["fingerprint"] = loc.fingerprint
    return loc.ref(manifest["splits"]["train"]["rows"])


# training ------------------------------------------------------------------------------------
def locate_sae(acts: DatasetRef, sae: SAEConfig, train: TrainConfig) -> Location:
    return _located(
        "sae",
        acts.store,
        acts.fingerprint,
        sae,
        train.model_dump(exclude={"device"}),
        code=(
            "sae_core.train",
            "sae_core.sae.topk",
            "sae_core.sae.kernels",
            "sae_core.sae.native",
            "sae_core.normalize",
        ),
    )


def train_sae(
    acts: DatasetRef, sae: SAEConfig, train: TrainConfig, progress: bool = True
) -> DatasetRef:
    from sae_core import train as training

    loc = locate_sae(acts, sae, train)
    if (manifest := loc.committed()) is None:
        with Store(acts.store).writing(loc.path) as writer:
            training.train_sae(
                acts,
                sae,
                train,
                writer,
                checkpoint_dir=f"checkpoints/{loc.fingerprint}",
                progress=progress,
            )
            writer.manifest["fingerprint"] = loc.fingerprint
            manifest = writer.manifest
    return loc.ref(manifest.get("tokens_seen", 0))


# evaluation ----------------------------------------------------------------------------------
def locate_evaluation(
    sae: DatasetRef, tokens: DatasetRef, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> Location:
    return _located(
        "eval",
        sae.store,
        sae.fingerprint,
        tokens.fingerprint,
        _model_identity(model),
        model.hook,
        model.dtype,
        data.skip_first_position,
        eval,
        code=("sae_core.evaluate", "sae_core.metrics", "sae_core.models"),
    )


def evaluate_sae(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    progress: bool = True,
) -> tuple[DatasetRef, dict[str, float]]:
    from sae_core import evaluate
    from sae_core.models import load_model
    from sae_core.sae import load_sae

    loc = locate_evaluation(sae, tokens, model, data, eval)
    if (manifest := loc.committed()) is None:
        loaded = load_model(resolve_model_path(model.path), model.dtype, model.device)
        trained = load_sae(sae)
        result = evaluate.evaluate_sae(
            trained,
            loaded.model,
            tokens,
            model.hook,
            eval.batch_contexts,
            first_position=1 if data.skip_first_position else 0,
            progress=progress,
        )
        with Store(sae.store).writing(loc.path) as writer:
            writer.write_json("latent_fire_counts.json", result.latent_fire_counts)
            writer.manifest = {
                "kind": "evaluation",
                "fingerprint": loc.fingerprint,
                "sae": sae.uri,
                "tokens": tokens.uri,
                "metrics": result.metrics,
            }
            manifest = writer.manifest
    return loc.ref(int(manifest["metrics"]["eval_tokens"])), manifest["metrics"]
