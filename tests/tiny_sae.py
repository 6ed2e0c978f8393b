"""A tiny trained SAE on the store, through the pipeline's own stages (no Prefect): shared by
the latent statistics and viewer tests. Stages are content-addressed, so modules that pass the
same store reuse each other's datasets."""

from __future__ import annotations

from pathlib import Path

from test_pipeline import tiny_config

from sae_core import stages
from sae_core.config import PipelineConfig
from sae_core.refs import DatasetRef


def tiny_sae(
    store: Path, model_dir: Path, corpus_dir: Path, **sae: object
) -> tuple[PipelineConfig, DatasetRef]:
    """(the config, the trained SAE's dataset); `sae` overrides the SAE section."""
    cfg = tiny_config(model_dir, corpus_dir, str(store), sae=sae)
    tokens = stages.sample_tokens(str(store), cfg.model, cfg.data, progress=False)
    acts = stages.extract_activations(tokens, cfg.model, cfg.data, progress=False)
    return cfg, stages.train_sae(acts, cfg.sae, cfg.train, progress=False)
