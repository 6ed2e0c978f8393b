"""Stage `tokens`: a corpus cut into token contexts with the model's tokenizer (sae_core.data.tokens)."""

from __future__ import annotations

from sae_core.config import DataConfig, ModelConfig
from sae_core.data import tokens
from sae_core.data.assets import resolve_corpus, resolve_model_path
from sae_core.env import hub_offline
from sae_core.stages.location import Location, corpus_identity, located, model_identity
from sae_core.storage.manifests import TokensManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

CODE = (tokens,)
_TOKEN_FIELDS = {"corpus", "text_column", "context_len", "train_tokens", "eval_tokens", "seed"}


def locate_tokens(store: str, model: ModelConfig, data: DataConfig) -> Location:
    return located(
        "tokens",
        store,
        data.model_dump(include=_TOKEN_FIELDS),
        corpus_identity(data.corpus),
        model_identity(model),  # the tokenizer lives with the model
        code=CODE,
    )


def sample_tokens(
    store: str, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    loc = locate_tokens(store, model, data)
    if (manifest := loc.committed(TokensManifest)) is not None:
        return loc.ref(manifest.splits["train"].tokens)
    hub_offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model.path))
    with Store(store).writing(loc.path) as writer:
        manifest = tokens.sample_tokens(
            data, tokenizer, resolve_corpus(data.corpus), writer, progress
        )
    return loc.ref(manifest.splits["train"].tokens)
