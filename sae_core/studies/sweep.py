"""A sweep's grid (every n x k x seed of `config.sweep`) and the row each trained SAE gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pydantic import ValidationError

from sae_core.config import PipelineConfig, SAEConfig, TrainConfig, format_validation_error
from sae_core.errors import ConfigError
from sae_core.studies.points import EvaluatedSAE


class GridPoint(NamedTuple):
    n: int
    k: int
    seed: int
    sae: SAEConfig
    train: TrainConfig


def point_tokens(config: PipelineConfig, n: int) -> int | None:
    """train.tokens for the sweep's n: train.tokens x (n / smallest n)^sweep.tokens_exponent,
    whole batches; train.tokens as it is without an exponent."""
    sweep, train = config.sweep, config.train
    if sweep.tokens_exponent is None:
        return train.tokens
    if train.tokens is None:
        raise ConfigError(
            "sweep.tokens_exponent scales train.tokens, which is not set; set train.tokens "
            "(the smallest n's budget) or drop sweep.tokens_exponent"
        )
    scaled = train.tokens * (n / min(sweep.n_latents)) ** sweep.tokens_exponent
    return max(1, round(scaled / train.batch_size)) * train.batch_size


def grid(config: PipelineConfig) -> list[GridPoint]:
    """The sweep's points, n-major: config.sae and config.train with n_latents, k, the training
    seed and (with sweep.tokens_exponent) train.tokens replaced. Fails before any work if a
    point is not a valid SAE config."""
    points = []
    for n in config.sweep.n_latents:
        for k in config.sweep.k:
            try:
                sae = SAEConfig.model_validate(config.sae.model_dump() | {"n_latents": n, "k": k})
            except ValidationError as err:
                reason = format_validation_error(err).split(": ", 2)[-1]
                raise ConfigError(f"config error: sweep point n={n}, k={k}: {reason}") from None
            for seed in config.sweep.seeds:
                update = {"seed": seed, "tokens": point_tokens(config, n)}
                train = config.train.model_copy(update=update)
                points.append(GridPoint(n, k, seed, sae, train))
    return points


class SweepPoint(EvaluatedSAE):
    """A trained and evaluated grid point."""


@dataclass(frozen=True)
class SweepRow:
    """One trained and evaluated SAE of a sweep."""

    n: int
    k: int
    seed: int
    kind: str  # sae.kind: a transcoder's figures are of its output hook's activation y
    metrics: dict[str, float]  # the evaluation's figures
    train_dead_fraction: float  # by the training criterion at the end of training

    @property
    def label(self) -> str:
        return f"n={self.n} k={self.k} seed={self.seed}"
