"""The whole configuration, `PipelineConfig`: every section, the `registry` section, and the
checks that span sections (a transcoder's hooks and the settings it cannot take)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from sae_core.config.common import Strict
from sae_core.config.data import DataConfig
from sae_core.config.evaluation import EvalConfig, SaeBenchConfig
from sae_core.config.latents import LatentsConfig
from sae_core.config.model import ModelConfig
from sae_core.config.sae import TRANSCODER_KINDS, SAEConfig
from sae_core.config.studies import FrontierConfig, SweepConfig
from sae_core.config.train import TrainConfig


class RegistryConfig(Strict):
    model_name: str = Field("saeflow-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    alias: str = Field("challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    experiment: str = Field("saeflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,99}$")


class PipelineConfig(Strict):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    store: str | None = Field(
        None,
        description="Store URI: a local directory or s3://bucket/prefix; default $SAEFLOW_HOME/store",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sae: SAEConfig = SAEConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    sweep: SweepConfig = SweepConfig()
    frontier: FrontierConfig = FrontierConfig()
    latents: LatentsConfig = LatentsConfig()
    saebench: SaeBenchConfig = SaeBenchConfig()

    @model_validator(mode="after")
    def _transcoder_hooks(self) -> PipelineConfig:
        transcoder = self.sae.kind in TRANSCODER_KINDS
        if transcoder and self.model.hook_out is None:
            raise ValueError(
                f"sae.kind={self.sae.kind} needs model.hook_out, the hook it reconstructs from "
                "model.hook; set e.g. model.hook=mlp_in.6 model.hook_out=mlp_out.6"
            )
        if not transcoder and self.model.hook_out is not None:
            raise ValueError(
                f"model.hook_out is for transcoders; unset it or set sae.kind=transcoder "
                f"(sae.kind={self.sae.kind} reconstructs model.hook)"
            )
        if transcoder and self.model.hook_out == self.model.hook:
            raise ValueError(
                f"model.hook_out={self.model.hook_out} equals model.hook; a transcoder reads one "
                "hook and reconstructs another (for one hook use sae.kind=topk)"
            )
        if transcoder and self.data.max_norm is not None:
            raise ValueError(
                "data.max_norm drops rows of each hook separately, which would unpair a "
                "transcoder's input and output rows; unset it"
            )
        if transcoder and self.model.compile:
            raise ValueError(
                "model.compile extracts one resid_post hook; a transcoder's pass extracts "
                "model.hook and model.hook_out: set model.compile=false"
            )
        return self

    @field_validator("store")
    @classmethod
    def _store_not_blank(cls, store: str | None) -> str | None:
        if store is not None and not store.strip():
            raise ValueError(
                "empty; give a directory or s3://bucket/prefix, or leave it out for the default"
            )
        return store
