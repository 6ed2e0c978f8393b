"""Paired activation datasets: a transcoder's input and output hooks, extracted in one pass.

Extraction writes one dataset per hook with the same rows in the same order (one forward pass,
the same contexts, shards and positions; data.max_norm, which drops rows per hook, is refused
for transcoders). Every row carries its key, (`sequence`, `position`, `token_id`): two datasets
pair when their manifests agree on the tokens and the layout, and their keys agree row for row.
The training reader (`sae_core.storage.loader.iter_batches(paired_with=...)`) relies on it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.errors import DatasetDamaged, ValidationFailed
from sae_core.storage.lanes import check_paired_splits
from sae_core.storage.loader import open_shard
from sae_core.storage.manifests import ActivationsManifest
from sae_core.storage.refs import DatasetRef

KEY_COLUMNS = ("sequence", "position", "token_id")
# What both manifests must agree on for their rows to be the same tokens.
_SHARED_FIELDS = ("model", "model_dtype", "context_len", "skip_first_position", "tokens")


class PairingReport(NamedTuple):
    """Two datasets found to pair."""

    rows: dict[str, int]
    """Rows compared per split (every row of each)."""
    hooks: tuple[str, str]
    """The input and output hooks."""


def check_pairing(ref_in: DatasetRef, ref_out: DatasetRef) -> PairingReport:
    """ValidationFailed unless the two datasets hold the same tokens in the same row order.

    Compares the manifests (tokens, model, layout, shards and row counts per split), then every
    row's key columns, shard by shard. Cost: reads the key columns only (16 bytes a row each),
    never the activations.
    """
    m_in, m_out = ref_in.manifest(ActivationsManifest), ref_out.manifest(ActivationsManifest)
    names = f"datasets {ref_in.uri} ({m_in.hook}) and {ref_out.uri} ({m_out.hook})"
    fix = "extract both hooks in one pass (model.hook and model.hook_out)"
    differ = [f for f in _SHARED_FIELDS if getattr(m_in, f) != getattr(m_out, f)]
    if differ or set(m_in.splits) != set(m_out.splits):
        raise ValidationFailed(
            f"{names} do not pair: their {', '.join(differ) or 'splits'} differ; {fix}"
        )
    rows = {}
    for split, info in m_in.splits.items():
        info_out = m_out.splits[split]
        try:
            check_paired_splits(ref_in, info, ref_out, info_out, m_in.dtype, m_out.dtype)
        except DatasetDamaged as err:  # the same finding, as a validation failure
            raise ValidationFailed(str(err)) from None
        for shard in info.shards:
            keys = [_keys(ref, shard.name) for ref in (ref_in, ref_out)]
            for column, a, b in zip(KEY_COLUMNS, *keys, strict=True):
                bad = np.flatnonzero(a != b)
                if bad.size:
                    raise ValidationFailed(
                        f"{names} do not pair: {shard.name} row {int(bad[0])} has {column} "
                        f"{a[bad[0]]} in one and {b[bad[0]]} in the other ({bad.size} rows "
                        f"differ); {fix}"
                    )
        rows[split] = info.rows
    return PairingReport(rows, (m_in.hook, m_out.hook))


def _keys(ref: DatasetRef, name: str) -> list[np.ndarray]:
    """The key columns of one shard, in KEY_COLUMNS order."""
    with open_shard(ref.open_store(), f"{ref.path}/{name}") as parquet:
        table = parquet.read(columns=list(KEY_COLUMNS))
    return [table.column(c).to_numpy() for c in KEY_COLUMNS]
