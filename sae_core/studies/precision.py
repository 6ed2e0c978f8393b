"""What a lower-precision model changes in the activations it writes: two activations datasets of
the same tokens (e.g. model.dtype=bfloat16 against float32), compared row by row."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.storage.loader import iter_batches
from sae_core.storage.manifests import ActivationsManifest
from sae_core.storage.refs import DatasetRef


class ActivationError(NamedTuple):
    """The relative error of `other`'s activations against `reference`'s, over one split."""

    rows: int
    """Activations compared."""
    relative_error: float
    """||other - reference||_F / ||reference||_F over all rows."""
    median_token_error: float
    """The median over tokens of ||other - reference|| / ||reference||."""
    p99_token_error: float
    """The 99th percentile of the same."""


def activation_error(
    reference: DatasetRef, other: DatasetRef, split: str = "eval"
) -> ActivationError:
    """Compare two activations datasets of one tokens dataset, row by row, on `split`."""
    manifests = [ref.manifest(ActivationsManifest) for ref in (reference, other)]
    if manifests[0].tokens != manifests[1].tokens or manifests[0].hook != manifests[1].hook:
        raise ValueError("the datasets hold different tokens or hooks; compare like with like")
    rows = manifests[0].splits[split].rows
    a, b = (next(iter_batches(ref, split, rows, seed=0)).double() for ref in (reference, other))
    token = (b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    return ActivationError(
        rows=rows,
        relative_error=float((b - a).norm() / a.norm()),
        median_token_error=float(token.median()),
        p99_token_error=float(torch.quantile(token, 0.99)),
    )
