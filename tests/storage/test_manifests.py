"""The typed manifests: every kind round-trips through its JSON, a manifest that does not fit
its model is refused in one line naming the dataset, the kind, the field and the fix, and the
JSON written from a real run equals the dict the writers built before the models (e58736d)."""

from __future__ import annotations

import json

import pytest

from sae_core.config import DataConfig, ModelConfig, SAEConfig, TrainConfig
from sae_core.data.activations import SPLITS, activation_manifest, shard_rows, storage_dtype
from sae_core.data.models import HookPoint
from sae_core.errors import DatasetDamaged, StoreError
from sae_core.sae import storage_report
from sae_core.stages import extract as extract_stage
from sae_core.stages import sample as sample_stage
from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import DatasetWriter, Store
from sae_core.training.group import GroupMember
from sae_core.training.train import train_group, write_trained
from tests.helpers.activations import sparse_dictionary_data, write_activations
from tests.helpers.manifests import example_sae, examples


def as_text(manifest: dict) -> str:
    """A manifest's JSON as the store writes it: NaN compares equal to NaN here."""
    return json.dumps(manifest, sort_keys=True)


def committed(store: Store, path: str, manifest) -> DatasetRef:
    store.commit(path, manifest)
    return DatasetRef(store=store.uri, path=path, fingerprint=path.rsplit("/", 1)[-1])


# Round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", examples(), ids=lambda m: m.kind)
def test_every_kind_round_trips_through_its_json(tmp_path, manifest):
    store = Store(str(tmp_path))
    ref = committed(store, f"{manifest.kind}/x", manifest)
    written = store.manifest(ref.path)
    assert as_text(written) == as_text(manifest.to_json() | {"uri": ref.uri})
    read = ref.manifest(type(manifest))
    assert read.uri == ref.uri
    assert as_text(read.to_json()) == as_text(written)
    assert as_text(type(manifest).from_json(json.loads(as_text(written)), ref.uri).to_json()) == (
        as_text(written)
    )


def test_an_optional_field_is_written_only_when_its_writer_sets_it():
    assert "batch_topk_threshold" not in example_sae().to_json()
    assert example_sae(batch_topk_threshold=0.5).to_json()["batch_topk_threshold"] == 0.5
    synthetic = ActivationsManifest(schema_version=1, width=4, dtype="float32", splits={})
    assert synthetic.to_json() == {
        "kind": "activations",
        "schema_version": 1,
        "width": 4,
        "dtype": "float32",
        "splits": {},
    }
    # Set to None is not left out: extraction records max_norm null when there is no filter.
    explicit = synthetic.model_copy(update={"max_norm": None})
    assert explicit.to_json()["max_norm"] is None


def test_an_old_activations_manifest_still_reads(tmp_path):
    """Schema version 1 (the list layout), shard names without their split folder, none of
    the figures later versions added."""
    store = Store(str(tmp_path))
    store.write_json(
        "activations/old/_MANIFEST.json",
        {
            "kind": "activations",
            "schema_version": 1,
            "fingerprint": "old",
            "model": "tiny",
            "hook": "resid_post.1",
            "dtype": "float32",
            "width": 16,
            "context_len": 8,
            "skip_first_position": True,
            "max_norm": None,
            "tokens": {"uri": "/s/tokens/t", "fingerprint": "t"},
            "splits": {
                "train": {
                    "rows": 100,
                    "dropped_max_norm": 0,
                    "norm_mean": 4.0,
                    "norm_max": 5.0,
                    "shards": [
                        {
                            "name": "shard-00000.parquet",
                            "rows": 100,
                            "bytes": 7000,
                            "norm_sum": 400.0,
                            "norm_max": 5.0,
                        }
                    ],
                }
            },
            "uri": f"{store.uri}/activations/old",
        },
    )
    ref = DatasetRef(store=store.uri, path="activations/old", fingerprint="old")
    manifest = ref.manifest(ActivationsManifest).recorded("tokens", "model", "hook")
    assert manifest.schema_version == 1 and manifest.contexts_per_shard is None
    assert manifest.splits["train"].shards[0].contexts is None


# Refusals ---------------------------------------------------------------------------------------
def damaged_by(tmp_path, edit, kind=ActivationsManifest) -> tuple[DatasetRef, DatasetDamaged]:
    """A committed copy of the example of `kind`'s model, its JSON edited by `edit`; the
    error reading it raises."""
    store = Store(str(tmp_path))
    [manifest] = [m for m in examples() if isinstance(m, kind)]
    written = manifest.to_json()
    edit(written)
    ref = committed(store, "activations/bad", written)
    with pytest.raises(DatasetDamaged) as info:
        ref.manifest(kind)
    return ref, info.value


def fix(ref: DatasetRef) -> str:
    return f"; delete the folder {ref.uri} and run again: it is recomputed"


def test_a_manifest_of_another_kind_is_refused(tmp_path):
    ref, err = damaged_by(tmp_path, lambda m: m.update(kind="sae"))
    assert str(err) == f"dataset {ref.uri}: kind is 'sae', not 'activations'{fix(ref)}"
    assert err.reason == "kind is 'sae', not 'activations'"
    assert isinstance(err, StoreError)  # the CLI prints it as one line


def test_a_manifest_without_a_kind_is_refused(tmp_path):
    ref, err = damaged_by(tmp_path, lambda m: m.pop("kind"))
    assert err.reason == "kind is None, not 'activations'"


def test_a_missing_field_is_named_with_the_kind(tmp_path):
    ref, err = damaged_by(tmp_path, lambda m: [m.pop("width"), m.pop("dtype")])
    assert str(err) == f"dataset {ref.uri}: activations manifest lacks width, dtype{fix(ref)}"


def test_a_missing_nested_field_is_named_by_its_path(tmp_path):
    _, err = damaged_by(tmp_path, lambda m: m["splits"]["train"]["shards"][0].pop("rows"))
    assert err.reason == "activations manifest lacks splits.train.shards.0.rows"


def test_a_field_of_the_wrong_type_is_named_with_what_it_holds(tmp_path):
    _, err = damaged_by(tmp_path, lambda m: m.update(width="64"))
    assert err.reason == (
        "activations manifest field width is '64': Input should be a valid integer"
    )
    _, err = damaged_by(tmp_path, lambda m: m.update(weights="best"), SaeManifest)
    assert err.reason == "sae manifest field weights is 'best': Input should be 'ema' or 'last'"


def test_an_unknown_field_is_refused(tmp_path):
    _, err = damaged_by(tmp_path, lambda m: m.update(rows=3))
    assert err.reason == "activations manifest holds an unknown field rows"


def test_a_reader_needing_an_optional_field_names_it(tmp_path):
    store = Store(str(tmp_path))
    synthetic = ActivationsManifest(schema_version=1, width=4, dtype="float32", splits={})
    ref = committed(store, "activations/synthetic", synthetic)
    with pytest.raises(DatasetDamaged, match=r"activations manifest lacks tokens, hook; delete"):
        ref.manifest(ActivationsManifest).recorded("width", "tokens", "hook")


def test_a_location_reads_its_committed_manifest(tmp_path):
    from sae_core.stages.location import Location

    store = Store(str(tmp_path))
    loc = Location(store.uri, "sae/fp", "fp")
    assert loc.committed(SaeManifest) is None and not loc.is_committed()
    store.commit(loc.path, example_sae(fingerprint="fp"))
    assert loc.is_committed() and loc.committed(SaeManifest).fingerprint == "fp"
    with pytest.raises(DatasetDamaged, match="kind is 'sae', not 'activations'"):
        loc.committed(ActivationsManifest)


# The JSON of a real run against the dicts the writers built before the models -------------------
def old_sae_manifest(trainer, acts: DatasetRef, fingerprint: str) -> dict:
    """training.train.summarize and write_trained as of e58736d, with what the train stage
    added (fingerprint, resumed_from_tokens)."""
    sae, st = trainer.sae, trainer.state
    tail = st.history[-max(1, len(st.history) // 20) :]
    window = min(sae.cfg.dead_window_tokens, max(st.tokens_seen, 1))
    figures = {
        "sae_kind": sae.cfg.kind,
        "d": sae.d,
        "n": sae.n_latents,
        "k": sae.k,
        "k_aux": sae.k_aux,
        "normalization": sae.norm.to_json(),
        "tokens_seen": st.tokens_seen,
        "steps": st.step,
        "lr": trainer.lr,
        "final_nmse": sum(r["nmse"] for r in tail) / len(tail) if tail else float("nan"),
        "dead_fraction": trainer.dead.fraction(),
        "dead_fraction_run": trainer.dead.fraction(window),
        "weights": "ema" if trainer.ema is not None else "last",
        "storage": storage_report(sae),
    } | ({"batch_topk_threshold": float(sae.threshold)} if sae.cfg.batch_topk else {})
    manifest = {"kind": "sae", "schema_version": 1, "activations": acts.uri} | figures
    return manifest | {"fingerprint": fingerprint, "resumed_from_tokens": 0}


@pytest.mark.parametrize("batch_topk", [False, True], ids=["topk", "batch_topk"])
def test_a_trained_sae_writes_the_manifest_it_wrote_before(tmp_path, one_thread, batch_topk):
    store = Store(str(tmp_path))
    x, _ = sparse_dictionary_data(1024)
    acts = write_activations(store, "activations/test", x, x[:256])
    sae_cfg = SAEConfig(n_latents=64, k=4, dead_window_tokens=512, batch_topk=batch_topk)
    train_cfg = TrainConfig(batch_size=256, device="cpu", checkpoint_every_tokens=10**6)
    [trainer] = train_group(acts, [GroupMember(sae_cfg, train_cfg, "checkpoints/fp")], store)
    with store.writing("sae/fp") as writer:
        write_trained(writer, acts, trainer)
    # Recorded since: the device and GEMM dtype training used, the recipe and its schedule
    # (the budget recipe: 5% of 4 steps of warm-up rounds to none; the rate held) and optimiser.
    recorded = {"device": "cpu", "gemm_dtype": "float32", "recipe": "budget"}
    recorded |= {"lr_warmup_steps": 0, "lr_decay": "none", "optimizer": "schedule_free_adam"}
    expected = old_sae_manifest(trainer, acts, "fp") | recorded | {"uri": store.url("sae/fp")}
    assert as_text(store.manifest("sae/fp")) == as_text(expected)
    assert ("batch_topk_threshold" in expected) is batch_topk


def old_activation_manifest(writer, tokens: DatasetRef, data_cfg, hook: str, shards) -> dict:
    """data.activations.activation_manifest as of e58736d, with the fingerprint the extract
    stage set."""
    src = tokens.open_store().manifest(tokens.path)
    marks = {split: writer.done_marks(split) for split in SPLITS}
    source = marks[shards[0].split][f"{shards[0].index:05d}"]["source"]
    splits = {}
    for split in SPLITS:
        done = [marks[split][f"{s.index:05d}"] for s in shards if s.split == split]
        entries = [m["shard"] for m in done if m["shard"] is not None]
        rows = sum(e["rows"] for e in entries)
        splits[split] = {
            "rows": rows,
            "dropped_max_norm": sum(m["dropped_max_norm"] for m in done),
            "norm_mean": sum(e["norm_sum"] for e in entries) / rows,
            "norm_max": max(e["norm_max"] for e in entries),
            "shards": entries,
        }
    return {
        "kind": "activations",
        "schema_version": 2,
        "fingerprint": writer.dataset.rsplit("/", 1)[-1],
        "model": source["model"],
        "model_dtype": source["model_dtype"],
        "hook": str(HookPoint.parse(hook)),
        "dtype": storage_dtype(source["model_dtype"], data_cfg),
        "width": source["width"],
        "context_len": src["context_len"],
        "batch_tokens": data_cfg.batch_tokens,
        "shard_rows": shard_rows(
            data_cfg, source["width"], storage_dtype(source["model_dtype"], data_cfg)
        ),
        "contexts_per_shard": shards[0].stop - shards[0].start,
        "skip_first_position": data_cfg.skip_first_position,
        "max_norm": data_cfg.max_norm,
        "tokens": {"uri": tokens.uri, "fingerprint": tokens.fingerprint},
        "splits": splits,
    }


def test_an_extraction_writes_the_manifest_it_wrote_before(
    tmp_path, tiny_llama_dir, tiny_corpus_dir
):
    store = Store(str(tmp_path))
    model = ModelConfig(path=str(tiny_llama_dir), hook="resid_post.2", device="cpu")
    data = DataConfig(
        corpus=str(tiny_corpus_dir), context_len=16, train_tokens=640, eval_tokens=160,
        batch_tokens=64, shard_rows=100, max_norm=0.4,
    )  # fmt: skip
    tokens = sample_stage.sample_tokens(store.uri, model, data, progress=False)
    plan = extract_stage.plan_activations(tokens, model, data, [model.hook])
    try:
        for shard in plan.missing:
            extract_stage.extract_activation_shard(plan, shard)
    finally:
        extract_stage.release_shard_model()
    writer = DatasetWriter(store, plan.locations[0].path)
    expected = old_activation_manifest(writer, tokens, data, model.hook, plan.shards)
    expected |= {"model_devices": ["cpu"]}  # recorded since: where the model ran
    assert expected["splits"]["train"]["dropped_max_norm"] > 0  # the filter ran
    built = activation_manifest(writer, tokens, data, model.hook, plan.shards)
    assert as_text(built.to_json()) == as_text(expected)
    [ref] = extract_stage.commit_activations(plan)
    assert as_text(store.manifest(ref.path)) == as_text(expected | {"uri": ref.uri})
