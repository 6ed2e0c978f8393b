"""The pipeline on the tiny model and corpus: a small configuration, one run of the flow, and one
sweep with the training reads it made."""

from __future__ import annotations

import pytest

from sae_core.config import PipelineConfig, build_config
from tests.helpers.activations import count_train_reads

# The pipeline's stage tasks, in order.
ALL_STAGES = [
    "sample_tokens",
    "extract_activations",
    "validate",
    "train_sae",
    "evaluate_sae",
    "saebench_sae",
    "register_model",
    "latent_stats",
    "report_run",
]


def tiny_config(model_dir, corpus_dir, store: str, **sections) -> PipelineConfig:
    data = {
        "name": "tiny-test",
        "store": store,
        "model": {"path": str(model_dir), "hook": "resid_post.2"},
        "data": {
            "corpus": str(corpus_dir),
            "context_len": 32,
            "train_tokens": 4096,
            "eval_tokens": 512,
            "shard_rows": 1500,
        },
        "sae": {"n_latents": 256, "k": 8, "dead_window_tokens": 2048},
        "train": {"batch_size": 256, "checkpoint_every_tokens": 2048},
        "registry": {"model_name": "tiny-sae"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return build_config(data)


def run(config: PipelineConfig, refresh: list[str] | None = None):
    from flows.pipeline import pipeline

    return pipeline(config, progress=False, refresh=refresh)


def sweep_counting_reads(config: PipelineConfig):
    """The sweep flow on `config`: (its result, the training reads it made as
    `count_train_reads` lists them)."""
    from flows.sweep import sweep

    with pytest.MonkeyPatch.context() as patch:
        reads = count_train_reads(patch)
        return sweep(config, progress=False), reads
