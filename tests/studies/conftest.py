"""The studies' shared fixture: the tiny test model's configuration as a preset file."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers.pipeline import tiny_config


@pytest.fixture
def tiny_preset(tiny_llama_dir, tiny_corpus_dir, tmp_path) -> str:
    """A preset YAML of `tiny_config` (the tiny random Llama and corpus; a store under tmp_path),
    for commands that take --preset."""
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path / "store"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)
