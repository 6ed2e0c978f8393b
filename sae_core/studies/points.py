"""An SAE of a study (a sweep's grid point, a frontier's SAE), trained and evaluated, by reference."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sae_core.storage.refs import DatasetRef


class EvaluatedSAE(BaseModel):
    """A trained and evaluated SAE of a study; small, it travels between tasks."""

    model_config = ConfigDict(frozen=True)

    n: int
    """Latents (sae.n_latents)."""
    k: int
    """Active latents per token (sae.k)."""
    seed: int
    """The training seed (train.seed)."""
    sae: DatasetRef
    """The committed SAE dataset."""
    evaluation: DatasetRef
    """Its committed evaluation."""
    metrics: dict[str, float]
    """The evaluation's figures."""
