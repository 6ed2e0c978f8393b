"""A transcoder's paired datasets: one extraction pass, the same rows, and a check that sees
when two datasets do not pair."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import torch

from sae_core.config import DataConfig, ModelConfig
from sae_core.data.models import decoder_layers
from sae_core.data.pairing import check_pairing
from sae_core.errors import DatasetDamaged, ValidationFailed
from sae_core.stages import extract as extract_stage
from sae_core.storage.loader import iter_batches
from sae_core.storage.refs import DatasetRef
from tests.helpers.extraction import TINY_DATA

HOOKS = ["mlp_in.1", "mlp_out.1"]


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tokens_ref):
    model = ModelConfig(path=str(tiny_llama_dir), hook=HOOKS[0], device="cpu")
    return extract_stage.extract_hook_datasets(
        tokens_ref, model, DataConfig(**TINY_DATA), HOOKS, progress=False
    )


def test_paired_rows_are_one_token_seen_at_both_hooks(pair, loaded):
    """Each paired row's output is the layer's MLP applied to its input: the same token."""
    ref_in, ref_out = pair
    assert check_pairing(ref_in, ref_out).rows == {"train": 600, "eval": 150}
    mlp = decoder_layers(loaded.model)[1].mlp
    batches = iter_batches(ref_in, "train", 64, seed=3, paired_with=ref_out)
    for batch in [next(batches) for _ in range(3)]:
        x, y = batch[:, :64], batch[:, 64:]
        with torch.inference_mode():
            torch.testing.assert_close(mlp(x), y, rtol=1e-4, atol=1e-5)
    # ...and not of another row: the pairing is not a coincidence of the test.
    with torch.inference_mode():
        assert not torch.allclose(mlp(x.roll(1, dims=0)), y, atol=1e-3)


@pytest.mark.parametrize(("lanes", "take"), [(4, None), (4, slice(16, 48)), (3, None)])
def test_paired_batches_follow_the_lane_plan_of_each_side(pair, lanes, take):
    """Through lanes, a take and their buffers, a paired batch is each dataset's own batch side
    by side: one row order for x and y, the one the input alone gets."""
    ref_in, ref_out = pair
    args = dict(batch_size=64, seed=5, epoch=1, lanes=lanes, take=take, buffer_tokens=256)
    paired = list(iter_batches(ref_in, "train", paired_with=ref_out, **args))
    alone = [list(iter_batches(ref, "train", **args)) for ref in pair]
    assert len(paired) == len(alone[0]) == 600 // 64
    for batch, x, y in zip(paired, *alone, strict=True):
        torch.testing.assert_close(batch, torch.cat([x, y], dim=1), rtol=0, atol=0)


def test_rows_out_of_order_do_not_pair(pair, store):
    ref_in, ref_out = pair
    moved = DatasetRef(store=store.uri, path="activations/reordered", fingerprint="reordered")
    src = store.path(f"{ref_out.path}/train/shard-00001.parquet")
    # A copy of the output dataset with one shard's rows reversed: same counts, other tokens.
    shutil.copytree(store.path(ref_out.path), store.path(moved.path), dirs_exist_ok=True)
    table = pq.read_table(src)
    pq.write_table(
        table.take(list(reversed(range(table.num_rows)))),
        store.path(f"{moved.path}/train/shard-00001.parquet"),
    )
    with pytest.raises(ValidationFailed, match=r"shard-00001.parquet row 0 has sequence"):
        check_pairing(ref_in, moved)


def test_datasets_of_other_settings_do_not_pair(pair, tiny_llama_dir, tokens_ref):
    ref_in, _ = pair
    model = ModelConfig(path=str(tiny_llama_dir), hook="mlp_out.1", device="cpu")
    other = extract_stage.extract_activations(
        tokens_ref, model, DataConfig(**TINY_DATA, skip_first_position=False), progress=False
    )
    with pytest.raises(ValidationFailed, match="skip_first_position differ"):
        check_pairing(ref_in, other)
    with pytest.raises(DatasetDamaged, match="do not pair"):
        next(iter_batches(ref_in, "train", 64, seed=0, paired_with=other))
