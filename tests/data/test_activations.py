from __future__ import annotations

import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_core import stopping
from sae_core.config import DataConfig
from sae_core.data.activations import extract_activations, extract_hooks, shard_rows
from sae_core.data.models import load_model, run_to_hook
from sae_core.data.tokens import sample_tokens
from sae_core.errors import ConfigError
from sae_core.storage.layout import (
    STORAGE_SCHEMA,
    activation_layout,
    activation_matrix,
    read_activations,
)
from sae_core.storage.loader import iter_batches, load_split_tensor, read_split
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tests.helpers import HELPERS
from tests.helpers.extraction import TINY_DATA

T = 16


def _extract(store, loaded, tokens_ref, name, **kw):
    with store.writing(f"activations/{name}") as w:
        manifest = extract_activations(
            loaded.model,
            tokens_ref,
            DataConfig(**{**TINY_DATA, **kw}),
            "resid_post.1",
            w,
            progress=False,
        )
    return manifest.to_json(), DatasetRef(
        store=store.uri,
        path=f"activations/{name}",
        fingerprint=name,
        rows=manifest.splits["train"].rows,
    )


@pytest.fixture(scope="module")
def acts(store, loaded, tokens_ref):
    return _extract(store, loaded, tokens_ref, "a0")


def test_manifest_and_shards(store, acts):
    manifest, ref = acts
    assert manifest["kind"] == "activations" and manifest["width"] == 64
    assert manifest["hook"] == "resid_post.1" and manifest["dtype"] == "float32"
    assert manifest["skip_first_position"] is True and manifest["max_norm"] is None
    # What model.device=auto and the model's dtype became, as the shards recorded them.
    assert manifest["model_devices"] == ["cpu"] and manifest["model_dtype"] == "float32"
    train = manifest["splits"]["train"]
    # 640 / 16 = 40 contexts, position 0 skipped: 40 * 15 rows; at most 100 rows a shard: 6
    # whole contexts (90 rows) a shard.
    assert train["rows"] == 40 * 15 == 600 and manifest["contexts_per_shard"] == 6
    assert [s["rows"] for s in train["shards"]] == [90] * 6 + [60]
    assert [s["contexts"] for s in train["shards"]][-2:] == [[30, 36], [36, 40]]
    assert [s["rows"] for s in manifest["splits"]["eval"]["shards"]] == [90, 60]
    for split in ("train", "eval"):
        for shard in manifest["splits"][split]["shards"]:
            data = store.read_bytes(f"{ref.path}/{shard['name']}")
            assert len(data) == shard["bytes"]
            table = pq.read_table(pa.BufferReader(data))
            assert table.schema == STORAGE_SCHEMA(64, "float32")
            assert activation_layout(table.schema) == (64, "float32", "")
            assert table.num_rows == shard["rows"]
    assert store.manifest(ref.path)["splits"] == manifest["splits"]


def test_a_stored_shard_reads_as_the_float32_rows_a_model_takes(store, acts):
    manifest, ref = acts
    shard = manifest["splits"]["train"]["shards"][0]["name"]
    rows = read_activations(store.open(f"{ref.path}/{shard}"))
    assert rows.shape == (90, 64) and rows.dtype == np.float32 and rows.flags.writeable
    np.testing.assert_array_equal(rows, load_split_tensor(ref, "train")[:90].numpy())


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
    torch.testing.assert_close(torch.from_numpy(activation_matrix(batches[0]).copy()), data[:90])
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
    assert activation_layout(table.schema) == (64, "float16", "")
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


def _layer_calls(model, layer: int):
    """A counter of forward calls into decoder block `layer`, and the hook handle."""
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    return calls, model.model.layers[layer].register_forward_hook(count)


def test_several_hooks_from_one_forward_pass(store, loaded, tokens_ref, acts):
    hooks = ["resid_post.1", "resid_pre.0", "mlp_out.2"]
    calls, handle = _layer_calls(loaded.model, 0)
    later, later_handle = _layer_calls(loaded.model, 3)
    try:
        with (
            store.writing("activations/m0") as w0,
            store.writing("activations/m1") as w1,
            store.writing("activations/m2") as w2,
        ):
            manifests = extract_hooks(
                loaded.model,
                tokens_ref,
                DataConfig(**TINY_DATA),
                hooks,
                [w0, w1, w2],
                progress=False,
            )
        manifests = [m.to_json() for m in manifests]
    finally:
        handle.remove()
        later_handle.remove()
    # 40 train + 10 eval contexts in shards of 6, 8 per forward: 7 + 2 passes, none past the
    # deepest hook.
    assert calls["n"] == 9 and later["n"] == 0
    assert [m["hook"] for m in manifests] == hooks
    single = load_split_tensor(acts[1], "train")
    ref0 = DatasetRef(store=store.uri, path="activations/m0", fingerprint="m0")
    torch.testing.assert_close(load_split_tensor(ref0, "train"), single, rtol=0, atol=0)
    ref2 = DatasetRef(store=store.uri, path="activations/m2", fingerprint="m2")
    assert not torch.equal(load_split_tensor(ref2, "train"), single)


def test_shard_size_from_megabytes_and_batches_by_tokens():
    data = DataConfig(**{**TINY_DATA, "shard_rows": None, "shard_mb": 128})
    rows = shard_rows(data, 576, "float32")
    assert rows % 8192 == 0 and 120 * 2**20 < rows * (576 * 4 + 16) <= 128 * 2**20
    assert shard_rows(data.model_copy(update={"shard_mb": 0.01}), 64, "float16") == 72
    assert shard_rows(data.model_copy(update={"shard_rows": 100}), 64, "float32") == 100


def test_bfloat16_model_is_stored_as_float32(store, tiny_llama_dir, tokens_ref):
    model = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu").model
    with store.writing("activations/bf16") as w:
        manifest = extract_activations(
            model, tokens_ref, DataConfig(**TINY_DATA, storage_dtype="float16"), "resid_post.1", w,
            progress=False,
        ).to_json()  # fmt: skip
    assert manifest["dtype"] == "float32" and manifest["model_dtype"] == "bfloat16"
    assert manifest["model_devices"] == ["cpu"]
    shard = manifest["splits"]["train"]["shards"][0]["name"]
    table = pq.read_table(store.open(f"activations/bf16/{shard}"))
    assert activation_layout(table.schema) == (64, "float32", "")


class _Killed(Exception):
    pass


def test_interrupted_extraction_only_makes_the_shards_it_had_not_finished(
    store, loaded, tokens_ref, acts
):
    path = "activations/resume"
    calls, handle = _layer_calls(loaded.model, 0)

    def kill_at_fourth_batch(*_):
        if calls["n"] == 3:  # one forward per shard (6 contexts): shards 0-2 written
            raise _Killed

    killer = loaded.model.model.layers[0].register_forward_pre_hook(kill_at_fourth_batch)
    try:
        with pytest.raises(_Killed), store.resuming(path) as w:
            extract_activations(
                loaded.model, tokens_ref, DataConfig(**TINY_DATA), "resid_post.1", w, False
            )
    finally:
        killer.remove()
    assert not store.is_committed(path)
    assert store.listdir(f"{path}/_progress/train") == ["00000.json", "00001.json", "00002.json"]
    assert store.listdir(f"{path}/train") == [f"shard-0000{i}.parquet" for i in range(3)]
    calls["n"] = 0
    try:
        with store.resuming(path) as w:
            manifest = extract_activations(
                loaded.model, tokens_ref, DataConfig(**TINY_DATA), "resid_post.1", w, False
            ).to_json()
    finally:
        handle.remove()
    # The 4 train shards left, then the 2 eval shards.
    assert calls["n"] == 4 + 2
    assert not store.exists(f"{path}/_progress")
    assert manifest["splits"] == acts[0]["splits"]
    for shard in manifest["splits"]["train"]["shards"]:
        name = shard["name"]
        assert store.read_bytes(f"{path}/{name}") == store.read_bytes(f"{acts[1].path}/{name}")


@pytest.mark.usefixtures("stop_request")
def test_a_stop_request_ends_extraction_at_the_next_decoder_block_and_it_resumes(
    store, loaded, tokens_ref
):
    two_forwards = {"batch_tokens": 3 * T}  # 6 contexts a shard, 3 a forward
    reference, _ = _extract(store, loaded, tokens_ref, "stop-ref", **two_forwards)
    path = "activations/stopped"
    first, first_handle = _layer_calls(loaded.model, 0)
    second, second_handle = _layer_calls(loaded.model, 1)

    def ctrl_c_in_third_forward(*_):
        if first["n"] == 3:  # the first forward of shard 1, block 0 just done
            stopping.request(signal.SIGINT)

    stopper = loaded.model.model.layers[0].register_forward_hook(ctrl_c_in_third_forward)
    data = DataConfig(**{**TINY_DATA, **two_forwards})
    try:
        with pytest.raises(stopping.StopRequested), store.resuming(path) as w:
            extract_activations(loaded.model, tokens_ref, data, "resid_post.1", w, False)
    finally:
        stopper.remove()
        second_handle.remove()
    assert (first["n"], second["n"]) == (3, 2)  # block 0 finished; block 1 never started
    assert not store.is_committed(path)
    assert store.listdir(f"{path}/_progress/train") == ["00000.json"]  # shard 1 is to redo
    stopping.reset()
    try:
        with store.resuming(path) as w:
            manifest = extract_activations(
                loaded.model, tokens_ref, data, "resid_post.1", w, False
            ).to_json()
    finally:
        first_handle.remove()
    assert manifest["splits"] == reference["splits"]
    for shard in manifest["splits"]["train"]["shards"]:
        name = shard["name"]
        assert store.read_bytes(f"{path}/{name}") == store.read_bytes(
            f"activations/stop-ref/{name}"
        )


def test_a_shard_is_the_same_bytes_whatever_the_order_and_threads(store, loaded, tokens_ref, acts):
    """Shards made one by one, in reverse order, on one thread, equal the whole extraction's."""
    from sae_core.data.activations import check_tokens, extract_shard, plan_shards

    data = DataConfig(**TINY_DATA)
    shards = plan_shards(check_tokens(tokens_ref, data, 512), data, 64, "float32")
    assert len(shards) == 7 + 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with store.writing("activations/reversed") as w:
            for shard in reversed(shards):
                extract_shard(loaded.model, tokens_ref, shard, data, ["resid_post.1"], [w])
            w.manifest = {}
    finally:
        torch.set_num_threads(threads)
    for shard in shards:
        made = store.read_bytes(f"activations/reversed/{shard.name}")
        assert made == store.read_bytes(f"{acts[1].path}/{shard.name}"), shard.name


@pytest.mark.slow
def test_sigkilled_extraction_restarts_at_the_first_unwritten_shard(
    tiny_llama_dir, tiny_corpus_dir, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    store = Store(str(tmp_path / "store"))
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    data = DataConfig(**{**TINY_DATA, "train_tokens": 3200})
    with store.writing("tokens/t") as w:
        sample_tokens(data, loaded.tokenizer, str(tiny_corpus_dir), w, progress=False)
    worker = [sys.executable, str(HELPERS / "extract_worker.py")]
    args = [str(tiny_llama_dir), store.uri, "tokens/t"]
    marks = tmp_path / "store/activations/killed/_progress/train"
    victim = subprocess.Popen([*worker, *args, "0.05"], env=os.environ.copy())
    deadline = time.monotonic() + 120
    while len(list(marks.glob("*.json"))) < 3:
        assert victim.poll() is None and time.monotonic() < deadline, "worker ended early"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not store.is_committed("activations/killed")
    done = len(list(marks.glob("*.json")))
    assert subprocess.run([*worker, *args, "0"], timeout=300).returncode == 0
    killed = store.manifest("activations/killed")
    with store.writing("activations/whole") as w:
        whole = extract_activations(
            loaded.model, DatasetRef(store=store.uri, path="tokens/t", fingerprint="t"),
            DataConfig(context_len=16, batch_tokens=64, shard_rows=50), "resid_post.1", w, False,
        ).to_json()  # fmt: skip
    assert killed["splits"] == whole["splits"] and done < len(whole["splits"]["train"]["shards"])

    def train_rows(name: str) -> torch.Tensor:
        ref = DatasetRef(store=store.uri, path=f"activations/{name}", fingerprint=name)
        return load_split_tensor(ref, "train")

    torch.testing.assert_close(train_rows("killed"), train_rows("whole"), rtol=0, atol=0)


def test_stage_extracts_several_hooks_once_and_shares_the_single_hook_location(
    store, tiny_llama_dir, tokens_ref, monkeypatch
):
    from sae_core.config import ModelConfig
    from sae_core.stages import extract as extract_stage

    model = ModelConfig(path=str(tiny_llama_dir), hook="resid_post.1", device="cpu")
    data = DataConfig(**TINY_DATA)
    refs = extract_stage.extract_hook_datasets(
        tokens_ref, model, data, ["resid_post.1", "mlp_out.0"]
    )
    assert [r.path for r in refs] == [
        extract_stage.locate_activations(tokens_ref, model, data).path,
        extract_stage.locate_activations(tokens_ref, model.model_copy(update={"hook": "mlp_out.0"}), data).path,
    ]  # fmt: skip
    assert all(store.is_committed(r.path) and r.rows == 600 for r in refs)
    assert not store.exists(f"{refs[0].path}/_progress")

    def no_model(*_a, **_k):
        raise AssertionError("committed datasets must not load the model")

    monkeypatch.setattr(extract_stage, "load_model", no_model)
    assert extract_stage.extract_activations(tokens_ref, model, data, progress=False) == refs[0]
