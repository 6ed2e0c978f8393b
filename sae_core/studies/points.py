"""An SAE of a study (a sweep's grid point, a frontier's SAE), trained and evaluated, by reference."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    kind: str
    """The SAE kind (sae.kind); a transcoder's figures (nmse, fvu, CE) are of its output hook."""
    sae: DatasetRef
    """The committed SAE dataset."""
    evaluation: DatasetRef
    """Its committed evaluation."""
    metrics: dict[str, float]
    """The evaluation's figures, with SAEBench's (sae_core.stages.saebench) when it ran."""


# SAEBench's figures a study's tables show (sae_core.stages.saebench), in table order.
SAEBENCH_COLUMNS = (
    "explained_variance", "cossim", "l2_ratio", "alive_fraction", "latents_over_1pct",
    "latents_over_10pct", "mean_max_decoder_cosine", "absorption_full", "absorption_fraction",
    "sparse_probe_acc_k1", "sparse_probe_acc_k2", "sparse_probe_acc_k5", "sparse_probe_acc_k10",
    "sparse_probe_acc_k20",
)  # fmt: skip


def measured_columns(columns: Iterable[str], metrics: Iterable[Mapping[str, float]]) -> list[str]:
    """The `columns`, in order, that some SAE of a study has a figure for."""
    seen = {name for m in metrics for name in m}
    return [c for c in columns if c in seen]


def saebench_columns(metrics: Iterable[Mapping[str, float]]) -> list[str]:
    """The SAEBENCH_COLUMNS some SAE of a study has a figure for (none: the stage was off)."""
    return measured_columns(SAEBENCH_COLUMNS, metrics)
