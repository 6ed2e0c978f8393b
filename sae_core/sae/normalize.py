"""Input normalisation for SAEs and the geometric median that initialises b_pre.

Modes (stored with the weights so inference applies the same transform):
- per_token (Gao et al.): centre each token over its d coordinates, scale it to unit norm.
  The per-token shift and scale come back as `NormStats` so a reconstruction maps back to raw
  space exactly: x_raw = x_norm * scale + shift.
- global: one scalar c fitted on a sample so that E||c x||^2 = d; no centring.
- none: identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from sae_core.errors import ConfigError
from sae_core.sae import kernels

NormMode = Literal["per_token", "global", "none"]
EPS = 1e-8  # s = max(||x - mean||, EPS): a zero token stays zero instead of becoming NaN


class NormStats(NamedTuple):
    """What maps normalised vectors back to raw space: x_raw = x_norm * scale + shift.

    shift: [B, 1] (per_token) or [] scalar 0; scale: [B, 1] (per_token) or [] scalar.
    """

    shift: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class InputNorm:
    """A normalisation mode and its fitted constant (`global_scale` is c in x_norm = c * x)."""

    mode: NormMode = "per_token"
    global_scale: float = 1.0

    @classmethod
    def fit(cls, mode: NormMode, sample: torch.Tensor) -> InputNorm:
        """sample: [N, d] raw activations. Cost O(N d)."""
        if mode not in ("per_token", "global", "none"):
            raise ConfigError(f"sae.normalize='{mode}': choose per_token, global or none")
        if mode != "global":
            return cls(mode)
        mean_sq = sample.double().pow(2).sum(dim=1).mean()
        if not torch.isfinite(mean_sq) or mean_sq <= 0:
            raise ConfigError(
                "sae.normalize=global: the activation sample has zero or non-finite energy"
            )
        return cls("global", float((sample.shape[1] / mean_sq).sqrt()))

    def apply(
        self, x: torch.Tensor, offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, NormStats]:
        """x: [B, d] raw -> (x_norm [B, d], stats). Cost O(B d).

        offset: [d] or None; given, the result is x_norm - offset (training passes b_pre: the
        per-token mode subtracts it in the same pass). The stats still invert x_norm itself.
        """
        if self.mode == "per_token":
            x_norm, shift, scale = kernels.normalize_tokens(x, EPS, offset)
            return x_norm, NormStats(shift, scale)
        zero = x.new_zeros(())
        x_norm, stats = x, NormStats(zero, x.new_ones(()))
        if self.mode == "global":
            x_norm = x * self.global_scale
            stats = NormStats(zero, x.new_tensor(1.0 / self.global_scale))
        return (x_norm if offset is None else x_norm - offset), stats

    def invert(self, x_norm: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        """x_norm: [B, d] -> raw [B, d] using the stats `apply` returned for the same tokens.

        Only per_token needs stats: its shift and scale differ per token.
        """
        if stats is not None:
            return x_norm * stats.scale + stats.shift
        if self.mode == "per_token":
            raise ConfigError(
                "decode: per_token normalisation needs the stats from encode; use sae.decode(*sae.encode(x))"
            )
        return x_norm / self.global_scale if self.mode == "global" else x_norm

    def to_json(self) -> dict[str, float | str]:
        return {"mode": self.mode, "global_scale": self.global_scale}

    @classmethod
    def from_json(cls, obj: dict) -> InputNorm:
        return cls(obj["mode"], float(obj["global_scale"]))


def geometric_median(
    x: torch.Tensor, iters: int = 100, tol: float = 1e-6, eps: float = 1e-8
) -> torch.Tensor:
    """Weiszfeld's algorithm: argmin_y sum_i ||x_i - y||. x: [N, d] -> [d]. Cost O(iters N d).

    Starts from the mean; each iteration re-weights the points by 1/distance. Distances are
    floored at eps so a point sitting on the estimate does not divide by zero.
    """
    x = x.double()
    y = x.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_next = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * y.norm().clamp_min(eps):
            break
    return y.float()
