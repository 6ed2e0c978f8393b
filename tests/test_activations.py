from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_core.activations import (
    ACTIVATION_SCHEMA,
    activation_matrix,
    extract_activations,
    iter_batches,
    load_split_tensor,
    read_split,
)
from sae_core.config import ConfigError, DataConfig
from sae_core.models import load_model, run_to_hook
from sae_core.refs import DatasetRef
from sae_core.store import Store
from sae_core.tokens import sample_tokens

T = 16
BASE = {
    "corpus": "tiny",
    "context_len": T,
    "train_tokens": 640,
    "eval_tokens": 160,
    "seed": 0,
    "batch_contexts": 8,
    "shard_rows": 100,
}


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def tokens_ref(store, loaded, tiny_corpus_dir):
    with store.writing("tokens/tok0") as w:
        sample_tokens(DataConfig(**BASE), loaded.tokenizer, str(tiny_corpus_dir), w, progress=False)
    return DatasetRef(store=store.uri, path="tokens/tok0", fingerprint="tok0")


def _extract(store, loaded, tokens_ref, name, **kw):
    with store.writing(f"activations/{name}") as w:
        manifest = extract_activations(
            loaded.model,
            tokens_ref,
            DataConfig(**{**BASE, **kw}),
            "resid_post.1",
            w,
            progress=False,
        )
    return manifest, DatasetRef(
        store=store.uri,
        path=f"activations/{name}",
        fingerprint=name,
        rows=manifest["splits"]["train"]["rows"],
    )


@pytest.fixture(scope="module")
def acts(store, loaded, tokens_ref):
    return _extract(store, loaded, tokens_ref, "a0")


def test_manifest_and_shards(store, acts):
    manifest, ref = acts
    assert manifest["kind"] == "activations" and manifest["width"] == 64
    assert manifest["hook"] == "resid_post.1" and manifest["dtype"] == "float32"
    assert manifest["skip_first_position"] is True and manifest["max_norm"] is None
    train = manifest["splits"]["train"]
    # 640 / 16 = 40 contexts, position 0 skipped: 40 * 15 rows, shards of 100.
    assert train["rows"] == 40 * 15 == 600
    assert [s["rows"] for s in train["shards"]] == [100] * 6
    assert [s["rows"] for s in manifest["splits"]["eval"]["shards"]] == [100, 50]
    for split in ("train", "eval"):
        for shard in manifest["splits"][split]["shards"]:
            data = store.read_bytes(f"{ref.path}/{shard['name']}")
            assert len(data) == shard["bytes"]
            table = pq.read_table(pa.BufferReader(data))
            assert table.schema == ACTIVATION_SCHEMA(64, "float32")
            assert table.num_rows == shard["rows"]
    assert store.manifest(ref.path)["splits"] == manifest["splits"]


def test_rows_match_the_model(store, loaded, acts, tokens_ref):
    _, ref = acts
    table = pa.Table.from_batches(list(read_split(ref, "eval")))
    tok = pq.read_table(store.open(f"{tokens_ref.path}/eval.parquet"))
    ids = torch.tensor(tok.column("tokens").to_pylist())
    with torch.inference_mode():
        expected = run_to_hook(loaded.model, ids, "resid_post.1")
    row_of_context = {c: i for i, c in enumerate(tok.column("context_id").to_pylist())}
    matrix = activation_matrix(table)
    assert set(table.column("position").to_pylist()) == set(range(1, T))
    for r in (0, 37, 149):
        seq, pos = table.column("sequence")[r].as_py(), table.column("position")[r].as_py()
        i = row_of_context[seq]
        np.testing.assert_allclose(matrix[r], expected[i, pos].numpy(), rtol=1e-5, atol=1e-6)
        assert table.column("token_id")[r].as_py() == ids[i, pos]


def test_load_split_tensor_and_read_split(acts):
    _, ref = acts
    data = load_split_tensor(ref, "train")
    assert data.shape == (600, 64) and data.dtype == torch.float32
    batches = list(read_split(ref, "train"))
    assert sum(b.num_rows for b in batches) == 600
    torch.testing.assert_close(torch.from_numpy(activation_matrix(batches[0]).copy()), data[:100])
    with pytest.raises(ValueError, match="no split"):
        load_split_tensor(ref, "test")


def test_iter_batches_deterministic_and_resumable(acts):
    _, ref = acts
    first = list(iter_batches(ref, "train", 64, seed=3))
    assert len(first) == 600 // 64 and all(b.shape == (64, 64) for b in first)
    again = list(iter_batches(ref, "train", 64, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    resumed = list(iter_batches(ref, "train", 64, seed=3, start_batch=4))
    assert all(torch.equal(a, b) for a, b in zip(first[4:], resumed, strict=True))
    other_epoch = next(iter_batches(ref, "train", 64, seed=3, epoch=1))
    assert not torch.equal(first[0], other_epoch)
    # A permutation: no row repeats within an epoch.
    rows = torch.cat(first)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    with pytest.raises(ConfigError, match=r"train\.batch_size=1000 exceeds the 600 rows"):
        next(iter_batches(ref, "train", 1000, seed=0))


def test_float16_full_positions_and_max_norm(store, loaded, tokens_ref, acts):
    manifest, ref = _extract(
        store, loaded, tokens_ref, "a16", storage_dtype="float16", skip_first_position=False
    )
    assert manifest["splits"]["train"]["rows"] == 40 * T
    table = pq.read_table(
        store.open(f"{ref.path}/{manifest['splits']['train']['shards'][0]['name']}")
    )
    assert table.schema.field("activation").type == pa.list_(pa.float16(), 64)
    assert 0 in table.column("position").to_pylist()
    data = load_split_tensor(ref, "train")
    assert data.dtype == torch.float32 and data.shape == (640, 64)

    full = load_split_tensor(acts[1], "train")
    cap = float(full.norm(dim=-1).median())
    capped, capped_ref = _extract(store, loaded, tokens_ref, "acap", max_norm=cap)
    train = capped["splits"]["train"]
    assert train["rows"] + train["dropped_max_norm"] == 600 and 0 < train["dropped_max_norm"] < 600
    assert train["norm_max"] <= cap and capped["max_norm"] == cap
    assert float(load_split_tensor(capped_ref, "train").norm(dim=-1).max()) <= cap * (1 + 1e-6)
    with pytest.raises(ConfigError, match=r"data\.max_norm.*dropped every"):
        _extract(store, loaded, tokens_ref, "anone", max_norm=1e-9)
    assert not store.is_committed("activations/anone")
