"""Activation dataset validation: summaries are right, and each kind of damage is caught by shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sae_core.data.validation import SummaryBuilder, summarize_dataset, summarize_table
from sae_core.errors import ConfigError, ValidationFailed
from sae_core.storage.layout import STORAGE_SCHEMA, storage_batch
from sae_core.storage.manifests import ActivationsManifest, ActivationsSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tasks.validate import validate_activations
from tests.helpers.activations import write_shard_table

WIDTH, VOCAB, CONTEXT = 16, 1000, 8
SHARDS = {"train": [100, 100], "eval": [50]}


def activation_table(
    x: np.ndarray, token_id: np.ndarray, dtype: str = "float32", stored: bool = False
) -> pa.Table:
    """x: [N, d] -> a shard table: the list layout (schema version 1), or the storage layout
    extraction writes now (version 2) if `stored`."""
    n, d = x.shape
    index = {
        "sequence": np.arange(n) // (CONTEXT - 1),
        "position": np.arange(n) % (CONTEXT - 1) + 1,
        "token_id": token_id,
    }
    if stored:
        batch = storage_batch({"activation": x.astype(dtype), **index}, STORAGE_SCHEMA(d, dtype))
        return pa.Table.from_batches([batch])
    values = pa.array(x.astype(dtype).reshape(-1))
    return pa.table(
        {
            "activation": pa.FixedSizeListArray.from_arrays(values, d),
            "sequence": pa.array(index["sequence"], pa.int64()),
            "position": pa.array(index["position"], pa.int32()),
            "token_id": pa.array(token_id, pa.int32()),
        }
    )


Mutate = Callable[[str, int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def make_dataset(
    root: Path, mutate: Mutate | None = None, dtype: str = "float32", stored: bool = False
) -> DatasetRef:
    """A committed activations dataset; `mutate(split, index, x, token_id)` may damage a shard."""
    store, path = Store(str(root)), "activations/test"
    rng = np.random.default_rng(0)
    with store.writing(path) as writer:
        splits = {}
        for split, sizes in SHARDS.items():
            shards = []
            for i, rows in enumerate(sizes):
                x = rng.normal(size=(rows, WIDTH)).astype(np.float32)
                token_id = rng.integers(0, VOCAB, rows)
                if mutate:
                    x, token_id = mutate(split, i, x, token_id)
                name = f"shard-{i:05d}.parquet"  # without its split folder, as older ones were
                table = activation_table(x, token_id, dtype, stored)
                shards.append(write_shard_table(writer, f"{split}/{name}", name, table, x))
            splits[split] = ActivationsSplit(rows=sum(sizes), shards=shards)
        writer.manifest = ActivationsManifest(
            schema_version=2 if stored else 1,
            fingerprint="test",
            model="tiny",
            hook="resid_post.1",
            dtype=dtype,
            width=WIDTH,
            context_len=CONTEXT,
            skip_first_position=True,
            max_norm=None,
            splits=splits,
        )
    return DatasetRef(store=store.uri, path=path, fingerprint="test", rows=200)


def damage_shard(which: tuple[str, int], change: Callable) -> Mutate:
    def mutate(split, i, x, token_id):
        return change(x.copy(), token_id.copy()) if (split, i) == which else (x, token_id)

    return mutate


def edit_manifest(ref: DatasetRef, edit: Callable[[dict], None]) -> None:
    store = ref.open_store()
    manifest = store.read_json(f"{ref.path}/_MANIFEST.json")
    edit(manifest)
    store.write_json(f"{ref.path}/_MANIFEST.json", manifest)


def failure_of(ref: DatasetRef) -> str:
    with pytest.raises(ValidationFailed) as info:
        validate_activations.fn(ref, VOCAB, progress=False)
    return str(info.value)


def test_summary_matches_numpy_and_merges_batches():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(300, WIDTH)) * 3 + 5).astype(np.float32)
    x[7, 3] = np.nan
    table = activation_table(x, rng.integers(0, VOCAB, 300))
    whole = summarize_table(table)
    np.testing.assert_allclose(whole.tokens["norm"][:5], np.linalg.norm(x[:5], axis=1), rtol=1e-5)
    np.testing.assert_allclose(whole.tokens["max_abs"][:5], np.abs(x[:5]).max(axis=1))
    assert whole.tokens["nonfinite"].tolist() == [1 if i == 7 else 0 for i in range(300)]
    assert np.isnan(whole.dims["mean"][3]) and len(whole.dims) == WIDTH

    clean = activation_table(np.nan_to_num(x), table.column("token_id").to_numpy())
    builder = SummaryBuilder(WIDTH)
    for batch in clean.to_batches(max_chunksize=64):  # uneven last batch exercises the merge
        builder.add(batch)
    streamed = builder.finish()
    np.testing.assert_allclose(streamed.dims["mean"], np.nan_to_num(x).mean(0), rtol=1e-6)
    np.testing.assert_allclose(streamed.dims["std"], np.nan_to_num(x).std(0), rtol=1e-5)


def test_null_activation_row_counts_as_nonfinite():
    x = np.ones((3, 4), np.float32)
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), 4, mask=pa.array([False, True, False])
    )
    table = pa.table(
        {
            "activation": column,
            "sequence": pa.array([0, 0, 0], pa.int64()),
            "position": pa.array([1, 2, 3], pa.int32()),
            "token_id": pa.array([1, 2, 3], pa.int32()),
        }
    )
    assert summarize_table(table).tokens["nonfinite"].tolist() == [0, 4, 0]


def test_good_dataset_passes(tmp_path):
    ref = make_dataset(tmp_path)
    report = validate_activations.fn(ref, VOCAB, progress=False)
    assert report.passed and report.failures == []
    assert (report.shards, report.rows) == (3, 250)


def test_float16_dataset_passes(tmp_path):
    report = validate_activations.fn(make_dataset(tmp_path, dtype="float16"), VOCAB, progress=False)
    assert report.passed


def _set(value, row=5, col=2):
    def change(x, token_id):
        x[row, col] = value
        return x, token_id

    return change


def _token(value):
    def change(x, token_id):
        token_id[3] = value
        return x, token_id

    return change


def _narrow(x, token_id):
    return x[:, : WIDTH - 4], token_id


def _freeze(x, token_id):
    x[:, 9] = 0.0
    return x, token_id


@pytest.mark.parametrize(
    "change, expected",
    [
        (_set(np.nan), "no NaN/inf values: 1 of 100 rows"),
        (_set(np.inf), "no NaN/inf values: 1 of 100 rows"),
        (_token(VOCAB), f"token_id in [0, {VOCAB}): 1 of 100 rows, e.g. {VOCAB}"),
        (_narrow, f"width {WIDTH} as in manifest: observed {WIDTH - 4}"),
    ],
    ids=["nan", "inf", "token-over-vocab", "wrong-width"],
)
def test_damaged_shard_is_named(tmp_path, change, expected):
    ref = make_dataset(tmp_path, damage_shard(("train", 1), change))
    message = failure_of(ref)
    assert f"train/shard-00001.parquet: {expected}" in message
    assert "1 of 3 shards" in message
    assert "shard-00000" not in message


def test_stored_float16_layout_passes(tmp_path):
    ref = make_dataset(tmp_path, dtype="float16", stored=True)
    report = validate_activations.fn(ref, VOCAB, progress=False)
    assert report.passed and report.rows == 250


@pytest.mark.parametrize(
    "change, expected",
    [
        (_set(np.nan), "no NaN/inf values: 1 of 100 rows"),
        (_narrow, f"width {WIDTH} as in manifest: observed {WIDTH - 4}"),
    ],
    ids=["nan", "wrong-width"],
)
def test_damage_in_the_stored_layout_is_named(tmp_path, change, expected):
    ref = make_dataset(tmp_path, damage_shard(("train", 1), change), stored=True)
    assert f"train/shard-00001.parquet: {expected}" in failure_of(ref)


def test_truncated_stored_shard_is_named(tmp_path):
    ref = make_dataset(tmp_path, stored=True)
    shard = tmp_path / "activations/test/train/shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    assert "train/shard-00001.parquet: unreadable: ArrowInvalid" in failure_of(ref)


def test_each_damaged_shard_is_named_once(tmp_path):
    damages = {("train", 0): _set(1e7), ("train", 1): _freeze, ("eval", 0): _token(-1)}

    def mutate(split, i, x, token_id):
        return damages[split, i](x.copy(), token_id.copy())

    lines = failure_of(make_dataset(tmp_path, mutate)).splitlines()
    assert "(3 of 3 shards)" in lines[0]
    assert lines[-1] == f"  data docs: file://{tmp_path}/validation/test/docs/index.html"
    assert lines[1:-1] == [
        "  eval/shard-00000.parquet: token_id in [0, 1000): 1 of 50 rows, e.g. -1",
        "  train/shard-00000.parquet: norm in [0.001, 1e+06]: 1 of 100 rows, e.g. 10000000.0",
        "  train/shard-00001.parquet: no constant dimension: 1 of 16 rows, e.g. True",
    ]


def test_truncated_shard_is_unreadable(tmp_path):
    ref = make_dataset(tmp_path)
    shard = tmp_path / "activations/test/eval/shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])
    message = failure_of(ref)
    assert "eval/shard-00000.parquet: unreadable: ArrowInvalid" in message
    # The split total no longer matches either: reported against the split, not a shard.
    assert "split eval: split rows as in manifest: rows_read=0 vs rows_manifest=50" in message


def test_missing_shard_is_unreadable(tmp_path):
    ref = make_dataset(tmp_path)
    (tmp_path / "activations/test/train/shard-00000.parquet").unlink()
    assert "train/shard-00000.parquet: unreadable: FileNotFoundError" in failure_of(ref)


def test_row_count_differs_from_manifest(tmp_path):
    ref = make_dataset(tmp_path)

    def edit(manifest):
        manifest["splits"]["train"]["shards"][0]["rows"] = 101
        manifest["splits"]["train"]["rows"] = 201

    edit_manifest(ref, edit)
    message = failure_of(ref)
    assert (
        "train/shard-00000.parquet: row count as in manifest: observed 100, expected 101" in message
    )
    assert "split train: split rows as in manifest: rows_read=200 vs rows_manifest=201" in message


def test_split_total_differs_from_its_shards(tmp_path):
    ref = make_dataset(tmp_path)
    edit_manifest(ref, lambda m: m["splits"]["eval"].update(rows=60))
    message = failure_of(ref)
    assert "split eval: shard rows sum to split rows: rows_listed=50 vs rows_manifest=60" in message
    assert "(0 of 3 shards)" in message


def test_dtype_and_manifest_norm_filter_are_checked(tmp_path):
    ref = make_dataset(tmp_path)
    edit_manifest(ref, lambda m: m.update(dtype="float16", max_norm=4.5))
    message = failure_of(ref)
    assert (
        "train/shard-00000.parquet: dtype as in manifest: dtype_read=float32 vs dtype_manifest=float16"
        in message
    )
    assert "norm in [0.001, 4.50045]" in message


def test_report_instead_of_raise(tmp_path):
    ref = make_dataset(tmp_path, damage_shard(("eval", 0), _set(np.nan)))
    report = validate_activations.fn(ref, VOCAB, progress=False, raise_on_failure=False)
    assert not report.passed
    assert report.failures == ["eval/shard-00000.parquet: no NaN/inf values: 1 of 50 rows, e.g. 1"]


def test_not_an_activations_dataset(tmp_path):
    ref = make_dataset(tmp_path)
    edit_manifest(ref, lambda m: m.update(kind="tokens"))
    with pytest.raises(ValidationFailed, match="kind is 'tokens', not 'activations'"):
        list(summarize_dataset(ref, progress=False))


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="min_norm"):
        validate_activations.fn(make_dataset(tmp_path), VOCAB, min_norm=10.0, max_norm=1.0)


def _docs_pages(store: Store, folder: str) -> list[str]:
    return [p.rsplit(f"{folder}/", 1)[1] for p in store.fs.find(store.path(folder))]


def test_data_docs_are_written_to_the_store(tmp_path):
    ref = make_dataset(tmp_path, damage_shard(("train", 1), _set(np.inf)))
    report = validate_activations.fn(ref, VOCAB, progress=False, raise_on_failure=False)
    store = ref.open_store()
    assert report.docs == f"file://{tmp_path}/validation/test/docs/index.html"
    saved = store.manifest("validation/test")
    assert saved["kind"] == "validation" and saved["failures"] == report.failures
    pages = _docs_pages(store, "validation/test/docs")
    assert "index.html" in pages
    assert {p.split("/")[1] for p in pages if p.startswith("expectations/")} >= {
        "saeflow-tokens.html",
        "saeflow-overview.html",
    }
    results = [p for p in pages if p.startswith("validations/")]
    # The overview, the two split checks and the one failing shard table; passing shards only
    # appear as rows of the overview.
    assert sorted(p.split("/")[1] for p in results) == [
        "saeflow-overview",
        "saeflow-splits",
        "saeflow-splits",
        "saeflow-tokens",
    ]
    assert any(p.endswith("train__shard-00001.parquet.html") for p in results)
    failing = next(p for p in results if p.startswith("validations/saeflow-tokens"))
    html = store.read_bytes(f"validation/test/docs/{failing}").decode()
    assert "no NaN/inf values" in html
    assert not any(p.endswith(".gif") for p in pages)


def test_validation_links_its_docs_from_the_flow_run(prefect, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    ref = make_dataset(tmp_path)

    @flow
    def check():
        return validate_activations(ref, VOCAB, progress=False)

    report = check()
    with get_client(sync_client=True) as client:
        links = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["validation-docs"]))
        )
    assert any(report.docs in a.data for a in links)
