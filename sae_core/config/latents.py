"""The `latents` section: the latent statistics behind `saeflow view`."""

from __future__ import annotations

from pydantic import Field, model_validator

from sae_core.config.common import Seed, Strict


class LatentsConfig(Strict):
    """The latent statistics behind `saeflow view` and the explainability metric
    (sae_core.latents.stats), computed in one pass over the eval activations."""

    top_contexts: int = Field(16, ge=1, le=256, description="Top activating contexts per latent.")
    random_contexts: int = Field(
        8, ge=0, le=256, description="Uniformly sampled firing contexts per latent (reservoir)."
    )
    window_before: int = Field(12, ge=0, le=256, description="Tokens shown before the peak.")
    window_after: int = Field(4, ge=0, le=256, description="Tokens shown after the peak.")
    histogram_bins: int = Field(
        32, ge=2, le=1024, description="Bins of each latent's activation histogram (a power of 2)."
    )
    logit_tokens: int = Field(10, ge=1, le=100, description="Logit-lens tokens shown per side.")
    max_ngram: int = Field(
        3, ge=1, le=3, description="Longest n-gram an explanation may be (ending at the peak)."
    )
    batch_tokens: int = Field(
        1024, ge=1, description="Activation rows per chunk (a [chunk, n] dense code matrix)."
    )
    sketch_width: int = Field(
        2**20, ge=2**10, le=2**26, description="Count-min sketch width for n-gram counts."
    )
    seed: Seed = Field(0, description="Seed of the reservoir samples.")

    @model_validator(mode="after")
    def _power_of_two_bins(self) -> LatentsConfig:
        if self.histogram_bins & (self.histogram_bins - 1):
            raise ValueError(
                f"latents.histogram_bins={self.histogram_bins}: choose a power of two, e.g. 32"
            )
        if self.max_ngram > self.window_before + 1:
            raise ValueError(
                f"latents.max_ngram={self.max_ngram} needs latents.window_before >= "
                f"{self.max_ngram - 1}; raise window_before or lower max_ngram"
            )
        return self
