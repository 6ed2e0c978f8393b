"""What a lower-precision model changes in the activations it writes: two activations datasets of
the same tokens (e.g. model.dtype=bfloat16 against float32), compared row by row."""

from __future__ import annotations

import json
import sys
from typing import NamedTuple

import torch

from sae_core.config import PipelineConfig, load_config
from sae_core.storage.loader import iter_batches
from sae_core.storage.manifests import ActivationsManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import default_store_uri


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


def dtype_error(config: PipelineConfig, dtype: str = "bfloat16") -> ActivationError:
    """The error of `config`'s activations extracted with model.dtype=`dtype` against float32,
    on the eval split; both extracted through the pipeline's stages on its store when missing."""
    from sae_core.stages.extract import extract_activations
    from sae_core.stages.sample import sample_tokens

    store = config.store or default_store_uri()
    refs = []
    for model_dtype in ("float32", dtype):
        model = config.model.model_copy(update={"dtype": model_dtype})
        refs.append(
            extract_activations(sample_tokens(store, model, config.data), model, config.data)
        )
    return activation_error(*refs)


if __name__ == "__main__":
    # python -m sae_core.studies.precision PRESET [key=value ...]
    print(json.dumps(dtype_error(load_config(sys.argv[1], sys.argv[2:]))._asdict()))
