"""Cheap checks that run before any heavy work, so bad input fails in seconds with one line."""

from __future__ import annotations

from typing import NamedTuple

from sae_core.assets import resolve_corpus, resolve_model_path
from sae_core.config import ConfigError, PipelineConfig
from sae_core.store import Store, default_store_uri


class ModelFacts(NamedTuple):
    width: int
    n_layers: int
    vocab_size: int


def inspect_model(path: str, hook: str) -> ModelFacts:
    """Read the model's config only (no weights) and check the hook exists in it."""
    from transformers import AutoConfig

    from sae_core.models import check_hook, num_layers

    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.path '{path}': cannot read a model config there ({type(err).__name__}); "
            "give a local Hugging Face model folder or a demo asset name and run `make setup`"
        ) from None
    check_hook(config, hook)
    return ModelFacts(
        width=config.hidden_size, n_layers=num_layers(config), vocab_size=config.vocab_size
    )


def preflight(config: PipelineConfig) -> ModelFacts:
    """Store reachable and writable, model and hook valid, corpus present."""
    facts = inspect_model(config.model.path, config.model.hook)
    resolve_corpus(config.data.corpus)
    Store(config.store or default_store_uri()).check()
    return facts
