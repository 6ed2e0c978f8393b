"""A tiny trained SAE (or skip transcoder) on the store, through the pipeline's own stages (no
Prefect): shared by the latent statistics, viewer and SAEBench tests. Stages are content-addressed, so modules that pass the
same store reuse each other's datasets."""

from __future__ import annotations

from pathlib import Path

from sae_core.config import PipelineConfig
from sae_core.stages import extract as extract_stage
from sae_core.stages import sample as sample_stage
from sae_core.stages import train as train_stage
from sae_core.storage.refs import DatasetRef
from tests.helpers.pipeline import tiny_config


def tiny_sae(
    store: Path, model_dir: Path, corpus_dir: Path, **sae: object
) -> tuple[PipelineConfig, DatasetRef]:
    """(the config, the trained SAE's dataset); `sae` overrides the SAE section."""
    cfg = tiny_config(model_dir, corpus_dir, str(store), sae=sae)
    tokens = sample_stage.sample_tokens(str(store), cfg.model, cfg.data, progress=False)
    acts = extract_stage.extract_activations(tokens, cfg.model, cfg.data, progress=False)
    return cfg, train_stage.train_sae(acts, cfg.sae, cfg.train, progress=False)


TRANSCODER = {
    "model": {"hook": "mlp_in.2", "hook_out": "mlp_out.2"},
    "sae": {"kind": "skip_transcoder", "normalize": "global"},
}


def tiny_transcoder(
    store: Path, model_dir: Path, corpus_dir: Path
) -> tuple[PipelineConfig, DatasetRef]:
    """(the config, the trained skip transcoder of block 2's MLP): both hooks from one pass."""
    cfg = tiny_config(model_dir, corpus_dir, str(store), **TRANSCODER)
    tokens = sample_stage.sample_tokens(str(store), cfg.model, cfg.data, progress=False)
    acts = extract_stage.extract_activations(tokens, cfg.model, cfg.data, progress=False)
    acts_out = extract_stage.paired_activations(acts, tokens, cfg.model, cfg.data, progress=False)
    return cfg, train_stage.train_sae(acts, cfg.sae, cfg.train, progress=False, acts_out=acts_out)
