"""Typed pipeline configuration, YAML presets and `--set key.path=value` overrides.

A module per section, each importing only `common` and the sections it composes:
`model`, `data`, `sae` (the SAE's kind and shape; `check_expander_graph`), `train`,
`evaluation` (`eval` and `saebench`), `studies` (`sweep`, `frontier`, and the kinds
`saeflow study kinds` compares), `latents`;
`pipeline` (`PipelineConfig`: every section, `registry`, and the checks that span sections);
`loading` (presets and overrides to a `PipelineConfig`). Every name is imported from here:
`from sae_core.config import SAEConfig`.
"""

from sae_core.config.common import SEED_MAX, Seed
from sae_core.config.data import DataConfig
from sae_core.config.evaluation import PROBE_CORPUS_FIELDS, EvalConfig, SaeBenchConfig
from sae_core.config.latents import LatentsConfig
from sae_core.config.loading import (
    PRESET_DIR,
    available_presets,
    build_config,
    format_validation_error,
    load_config,
    parse_override,
)
from sae_core.config.model import ModelConfig
from sae_core.config.pipeline import PipelineConfig, RegistryConfig
from sae_core.config.sae import TRANSCODER_KINDS, SAEConfig, check_expander_graph
from sae_core.config.studies import (
    STUDY_KINDS,
    FrontierConfig,
    StudyKind,
    SweepConfig,
    study_kind_overrides,
)
from sae_core.config.train import TRAIN_EXECUTION_FIELDS, TrainConfig

__all__ = [
    "PRESET_DIR",
    "PROBE_CORPUS_FIELDS",
    "SEED_MAX",
    "STUDY_KINDS",
    "TRAIN_EXECUTION_FIELDS",
    "TRANSCODER_KINDS",
    "DataConfig",
    "EvalConfig",
    "FrontierConfig",
    "LatentsConfig",
    "ModelConfig",
    "PipelineConfig",
    "RegistryConfig",
    "SAEConfig",
    "SaeBenchConfig",
    "Seed",
    "StudyKind",
    "SweepConfig",
    "TrainConfig",
    "available_presets",
    "build_config",
    "check_expander_graph",
    "format_validation_error",
    "load_config",
    "parse_override",
    "study_kind_overrides",
]
