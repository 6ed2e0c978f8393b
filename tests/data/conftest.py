"""The extraction tests' inputs, one of each per test module: the tiny model loaded, a store, and
its tokens sampled from the tiny corpus (tests.helpers.extraction.TINY_DATA)."""

from __future__ import annotations

import pytest

from sae_core.config import DataConfig
from sae_core.data.models import load_model
from sae_core.data.tokens import sample_tokens
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tests.helpers.extraction import TINY_DATA


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def tokens_ref(store, loaded, tiny_corpus_dir):
    with store.writing("tokens/tok0") as w:
        sample_tokens(
            DataConfig(**TINY_DATA), loaded.tokenizer, str(tiny_corpus_dir), w, progress=False
        )
    return DatasetRef(store=store.uri, path="tokens/tok0", fingerprint="tok0")
